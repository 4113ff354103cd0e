"""Text helpers shared by engines: plain transcripts and stop strings."""

from __future__ import annotations

from actors.engines.base import ChatMessage


def plain_transcript(messages: tuple[ChatMessage, ...]) -> str:
    """A conversation as plain text for base models that have no chat template."""
    parts: list[str] = []
    for message in messages:
        if message.role == "system":
            parts.append(message.content.strip() + "\n")
        else:
            speaker = "User" if message.role == "user" else "Assistant"
            parts.append(f"{speaker}: {message.content.strip()}")
    parts.append("Assistant:")
    return "\n".join(parts)


def lone_surrogate_at(text: str) -> int | None:
    """Where `text` holds a lone UTF-16 surrogate ("\\ud800"), if anywhere.

    JSON escapes and Python strings allow them, but they are not Unicode text: no
    tokenizer encodes one and no decoded text contains one.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return error.start
    return None


def trim_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """Cut `text` at the earliest stop string; say whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class StopTrimmer:
    """Streams text while holding back just enough to never emit part of a stop string."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.pending += piece
        text, self.stopped = trim_at_stop(self.pending, self.stops)
        if self.stopped:
            self.pending = ""
            return text
        cut = len(self.pending) - self.hold
        if cut <= 0:
            return ""
        emitted, self.pending = self.pending[:cut], self.pending[cut:]
        return emitted

    def flush(self) -> str:
        rest, self.pending = self.pending, ""
        return "" if self.stopped else rest

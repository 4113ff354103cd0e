from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from actors.engines.base import ChatMessage
from actors.engines.text import StopTrimmer, plain_transcript, trim_at_stop

STOPS = ("\nUser:", "\nAssistant:")


def test_trim_at_earliest_stop() -> None:
    assert trim_at_stop("hi\nAssistant: x\nUser: y", STOPS) == ("hi", True)
    assert trim_at_stop("no stops", STOPS) == ("no stops", False)


def test_plain_transcript_ends_with_assistant_turn() -> None:
    text = plain_transcript(
        (
            ChatMessage("system", "Be kind."),
            ChatMessage("user", "Hi"),
            ChatMessage("assistant", "Hello"),
        )
    )
    assert text == "Be kind.\n\nUser: Hi\nAssistant: Hello\nAssistant:"


@given(st.lists(st.text(alphabet="ab\nUser:Assistn", max_size=6), max_size=12))
def test_stream_trimmer_equals_whole_text_trim(pieces: list[str]) -> None:
    trimmer = StopTrimmer(STOPS)
    streamed = "".join(trimmer.feed(p) for p in pieces) + trimmer.flush()
    expected, stopped = trim_at_stop("".join(pieces), STOPS)
    assert streamed == expected
    assert trimmer.stopped == stopped

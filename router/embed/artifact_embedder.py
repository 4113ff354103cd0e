"""Which embedder a saved classifier was trained on, kept beside it.

A classifier's weights only mean something for the vectors it was trained on; the
static embedder and MiniLM both give 384 dimensions, so a mix-up would load and
route silently wrong. The name is written next to the classifier and checked when
a config loads it.
"""

from __future__ import annotations

import json
from pathlib import Path

EMBEDDER_FILE = "embedder.json"


def save_embedder_name(directory: Path, name: str) -> None:
    (directory / EMBEDDER_FILE).write_text(json.dumps({"embedder": name}) + "\n")


def trained_embedder(directory: Path) -> str | None:
    """The recorded embedder name, or None for a classifier saved without one."""
    path = directory / EMBEDDER_FILE
    if not path.exists():
        return None
    try:
        name = json.loads(path.read_text())["embedder"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a valid embedder record: {error}") from None
    if not isinstance(name, str) or not name:
        raise ValueError(f"{path} names no embedder (got {name!r})")
    return name

"""JSON Lines records, one object per line, with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def json_objects(path: Path, error: type[Exception]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; `error` for anything else."""
    with path.open(encoding="utf-8") as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as problem:
                raise error(f"{path}:{number}: not valid JSON ({problem})") from problem
            if not isinstance(record, dict):
                raise error(f"{path}:{number}: expected a JSON object")
            yield number, record

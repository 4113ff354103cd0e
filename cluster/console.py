"""Progress lines: how `coe` commands and the benchmarks tell a person what they are doing.

It imports nothing of the project and not Ray, so the command line, the benchmarks and
the Serve wiring can all use it (the router keeps its own: it must not import `cluster`).

Two forms are in use. `say` is the `coe` commands' voice: `[coe] ...` on stdout. A
benchmark's `progress` goes to stderr without a prefix, so its stdout holds only the
table it prints at the end. Both flush at once: a line must show up while the slow step
it announces runs, even when the output is a pipe (benchmarks/startup.py reads `coe
serve`'s ready line through one).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

Say = Callable[[str], None]

COE_PREFIX = "[coe] "


def _stream(to_stderr: bool) -> TextIO:
    # Looked up at every line, not once: pytest's capture and redirections swap sys.stdout.
    return sys.stderr if to_stderr else sys.stdout


def sayer(prefix: str = "", *, to_stderr: bool = False, flush: bool = True) -> Say:
    """A function that prints one progress line as `prefix + line`."""

    def say_line(line: str) -> None:
        print(f"{prefix}{line}", file=_stream(to_stderr), flush=flush)

    return say_line


say: Say = sayer(COE_PREFIX)
progress: Say = sayer(to_stderr=True)

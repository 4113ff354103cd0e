"""Arena files nobody maps any more are removed; one a live process maps never is."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from memory_tiers.arena import DeviceArena, Region
from memory_tiers.arena_files import remove_stale, remove_unused

NAMES = re.compile(r"coe-app-[0-9a-f]{4}-host0\.arena")


def test_an_arena_is_removed_only_once_no_process_maps_it(tmp_path: Path) -> None:
    path = tmp_path / "coe-app-00aa-host0.arena"
    creator = DeviceArena.create_file(path, 1 << 16)
    replica = DeviceArena.attach_file(path, writable=False)
    assert not remove_unused(path)  # both map it
    creator.close()
    assert not remove_unused(path)  # a read-only mapping counts too
    replica.close()
    assert remove_unused(path) and not path.exists()
    assert not remove_unused(path)  # gone already: nothing to do


def test_closing_an_arena_lets_go_of_it_while_views_into_it_live_on(tmp_path: Path) -> None:
    """A replica's model keeps views into the mapping until the process ends; closing
    the arena must still tell others it no longer uses the file."""
    path = tmp_path / "coe-app-00aa-host0.arena"
    creator = DeviceArena.create_file(path, 1 << 16)
    replica = DeviceArena.attach_file(path, writable=False)
    views = [creator.host_view(Region(0, 4)), replica.host_view(Region(0, 4))]
    creator.close()
    replica.close()
    assert remove_unused(path)
    assert views[1].tolist() == [0, 0, 0, 0]  # the mapping itself outlives the file


def test_stale_arenas_of_the_pattern_go_and_everything_else_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale = tmp_path / "coe-app-00aa-host0.arena"
    stale.write_bytes(b"\0" * 64)  # a killed cluster's: nobody holds it
    live = DeviceArena.create_file(tmp_path / "coe-app-11bb-host0.arena", 1 << 16)
    kept = tmp_path / "coe-app-22cc-host0.arena"
    kept.write_bytes(b"\0" * 64)
    other_app = tmp_path / "coe-other-33dd-host0.arena"
    other_app.write_bytes(b"\0" * 64)
    link = tmp_path / "coe-app-44ee-host0.arena"
    link.symlink_to(other_app)
    removed = remove_stale(tmp_path, NAMES, keep=kept)
    assert removed == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "coe-app-11bb-host0.arena",
        "coe-app-22cc-host0.arena",
        "coe-app-44ee-host0.arena",
        "coe-other-33dd-host0.arena",
    ]
    live.close()
    me = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: me + 1)  # now they belong to someone else
    assert remove_stale(tmp_path, NAMES) == []
    monkeypatch.undo()
    assert sorted(p.name for p in remove_stale(tmp_path, NAMES)) == [
        "coe-app-11bb-host0.arena",
        "coe-app-22cc-host0.arena",
    ]
    assert remove_stale(tmp_path / "missing", NAMES) == []

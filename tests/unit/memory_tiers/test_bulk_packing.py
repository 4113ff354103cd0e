"""Packing many experts: each distinct source once, failures kept to their experts."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from memory_tiers.bulk_packing import PackOutcome, pack_many
from memory_tiers.ddr import CallableSource, Packed
from memory_tiers.packing import TensorEntry, TensorIndex


class Counted:
    """A source that counts its builds and can be made to fail."""

    def __init__(self, fill: int, fails: bool = False) -> None:
        self.fill, self.fails, self.builds = fill, fails, 0
        self.lock = threading.Lock()

    def build(self) -> Packed:
        with self.lock:
            self.builds += 1
        if self.fails:
            raise OSError(f"source {self.fill} is unreadable")
        index = TensorIndex((TensorEntry("w", "uint8", (8,), 0, 8),), 8)
        return np.full(8, self.fill, dtype=np.uint8), index

    def describe(self) -> str:
        return f"counted {self.fill}"


@pytest.mark.parametrize("workers", [1, 2])
def test_experts_with_one_key_share_one_packing(workers: int) -> None:
    shared, own, broken = Counted(1), Counted(2), Counted(3, fails=True)
    sources = {"a": shared, "b": shared, "c": own, "d": broken}
    keys = {"a": "ckpt-1", "b": "ckpt-1", "c": "ckpt-2", "d": "ckpt-3"}
    outcomes: dict[str, PackOutcome] = {}
    steps: list[tuple[int, int]] = []

    def record(expert: str, outcome: PackOutcome) -> None:
        assert threading.current_thread() is threading.main_thread()
        outcomes[expert] = outcome

    read = pack_many(sources, keys, record, workers=workers, progress=lambda *s: steps.append(s))
    assert read == 3
    assert shared.builds == own.builds == broken.builds == 1
    assert sorted(outcomes) == ["a", "b", "c", "d"]
    assert outcomes["a"] is outcomes["b"]
    good = outcomes["c"]
    assert not isinstance(good, BaseException) and int(good[0][0]) == 2
    assert isinstance(outcomes["d"], OSError)  # only its own expert fails
    assert sorted(steps) == [(1, 3), (2, 3), (3, 3)]


def test_workers_must_be_positive() -> None:
    with pytest.raises(ValueError, match="workers"):
        pack_many({"a": CallableSource(lambda: Counted(1).build())}, {"a": 1}, print, workers=0)

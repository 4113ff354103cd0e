"""What the router asks of a sentence embedder, whichever family it comes from."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Embedder(Protocol):
    """Maps texts to L2-normalised float32 vectors of a fixed dimension."""

    @property
    def dimension(self) -> int: ...

    def embed(self, texts: list[str]) -> np.ndarray: ...

"""The DDR tier's object store: Ray's shared-memory object store.

`put` copies an expert's packed buffer into the object store once; `get` maps it
back zero-copy (a read-only numpy view of shared memory). The process that puts an
object owns it: the placement service does, so the weights outlive every replica.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, ObjectFetchTimedOutError, ObjectLostError

from cluster.serve.ray_internals import in_local_object_store
from memory_tiers.errors import ObjectLost

# A buffer the store no longer has must not hang a switch; rebuilding from disk is
# the answer, and that is the caller's (DDRStore's) job.
GET_TIMEOUT_S = 60.0


class RayObjectStore:
    """`memory_tiers.ddr.ObjectStore` over `ray.put` / `ray.get`."""

    def put(self, array: np.ndarray) -> ray.ObjectRef:
        return ray.put(array)

    def get(self, ref: Any) -> np.ndarray:
        try:
            value = ray.get(ref, timeout=GET_TIMEOUT_S)
        except (ObjectLostError, ObjectFetchTimedOutError, GetTimeoutError) as error:
            raise ObjectLost(f"object {ref} is gone from the object store: {error}") from error
        if not isinstance(value, np.ndarray):
            raise TypeError(f"object {ref} holds {type(value).__name__}, not a numpy buffer")
        return value

    def spilled(self, ref: Any) -> bool:
        """Spilled and not in shared memory now. The owner (the placement service) knows
        from its own reference table whether the object was ever spilled; only then is
        the local store asked whether it still holds it (its location table keeps the
        node of a spilled copy, so it cannot say)."""
        from ray.experimental import get_local_object_locations

        location = get_local_object_locations([ref]).get(ref) or {}
        return bool(location.get("did_spill")) and not in_local_object_store(ref)

    def free(self, ref: Any) -> None:
        # Dropping the last reference lets Ray reclaim the object; nothing to force.
        del ref

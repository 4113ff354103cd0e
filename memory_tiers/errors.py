"""Typed errors of the memory tiers; every message names the bad value."""

from __future__ import annotations


class TierError(RuntimeError):
    """Base class of every memory-tier error."""


class TierConfigError(TierError, ValueError):
    """A tier configuration that cannot work (budget too small, unknown policy, ...)."""


class ExpertTooLarge(TierConfigError):
    """An expert that can never fit in a device's budget."""


class PinnedOverBudget(TierConfigError):
    """Pinned experts that together exceed a device's budget."""


class ObjectLost(TierError):
    """An object is gone from the object store (evicted, owner or node died)."""


class BudgetExceeded(TierError):
    """No room can be made on a device: every resident is in use or pinned."""


class UnknownExpert(TierError, LookupError):
    """An expert name the registry does not know."""


class UnknownDevice(TierError, LookupError):
    """A device name the placement service does not know."""


class LeaseError(TierError):
    """A lease that is not outstanding (released twice, or from an older generation)."""


class NotResident(TierError):
    """An operation that needs the expert resident on the device."""


class SwitchFailed(TierError):
    """Bringing an expert into device memory failed; no lease was granted."""


class BindError(TierError):
    """Tensors that do not match a model skeleton (missing, unexpected or mismatched)."""


class ArenaError(TierError):
    """An arena that cannot be created, attached, or allocated from as asked."""


class ExpertUnavailable(TierError):
    """An expert configured but not servable (its checkpoint could not be packed)."""


class SlotWaitTimeout(TierError):
    """No active slot freed up within the wait bound (``tiers.slot_wait_s``)."""


class GrantExpired(TierError):
    """A grant outlived its deadline and was taken back; its bytes may be overwritten."""


class SourceChanged(ExpertUnavailable):
    """A replica asked for an expert's bytes from one source (checkpoint and dtype) while
    the placement service holds another: a `coe apply` changed the expert and one side
    has not caught up yet. Never answered with the other source's bytes."""

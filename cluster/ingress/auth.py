"""The optional API key, checked the same way on HTTP and gRPC.

The key is compared in constant time so response timing says nothing about how
much of a guess was right, and a refusal never says why (missing, malformed or
wrong all read the same).
"""

from __future__ import annotations

import hashlib
import hmac

BEARER = "bearer "
UNAUTHORIZED_MESSAGE = "a valid API key is required"
# A key's fingerprint lets `coe apply` tell whether it would change the running key, and
# gives the ingress a version that changes exactly when its key does, while the key
# itself never leaves the process that holds it. PBKDF2 makes guessing a weak key from
# its fingerprint slow.
FINGERPRINT_SALT = b"coe-api-key-fingerprint"
FINGERPRINT_ROUNDS = 200_000


def key_fingerprint(key: str | None) -> str | None:
    """A one-way digest of the key as the gate uses it (stripped); None for no key."""
    stripped = key.strip() if key else ""
    if not stripped:
        return None
    digest = hashlib.pbkdf2_hmac("sha256", stripped.encode(), FINGERPRINT_SALT, FINGERPRINT_ROUNDS)
    return digest.hex()[:32]


class ApiKeyGate:
    """Decides whether an `Authorization` value carries the cluster's key.

    With no key configured the gate is open and admits everything.
    """

    def __init__(self, key: str | None) -> None:
        # Presented keys are stripped, so the configured one is too (a key read from
        # a file often ends in a newline). A key of only spaces is a mistake, and
        # treating it as "no key" would open the API.
        stripped = key.strip() if key else ""
        if key and not stripped:
            raise ValueError(
                "the API key is blank (only whitespace); unset it to leave the API open"
            )
        self._key = stripped.encode() if stripped else None
        self._fingerprint: str | None = None

    @property
    def open(self) -> bool:
        return self._key is None

    @property
    def fingerprint(self) -> str | None:
        """`key_fingerprint` of this gate's key (computed once, on first use)."""
        if self._key is not None and self._fingerprint is None:
            self._fingerprint = key_fingerprint(self._key.decode())
        return self._fingerprint

    def admits(self, authorization: str | None) -> bool:
        if self._key is None:
            return True
        if not authorization or authorization[: len(BEARER)].lower() != BEARER:
            # Still compare, so a missing header costs the same as a wrong key.
            hmac.compare_digest(b"", self._key)
            return False
        presented = authorization[len(BEARER) :].strip().encode()
        return hmac.compare_digest(presented, self._key)

    def __repr__(self) -> str:  # never show the key, not even in a traceback
        return f"ApiKeyGate(open={self.open})"

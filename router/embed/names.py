"""The sentence embedders' names, known without loading any embedder.

Light on purpose: the cluster's config checks `router.embedder` against these names in
every replica that reads the config, the ingress included, which must not pay for
numpy-heavy embedding code it never runs.
"""

from __future__ import annotations

import re

MINILM_NAME = "all-MiniLM-L6-v2"
STATIC_EMBEDDER_NAME = "all-MiniLM-L6-v2-static"
KNOWN_EMBEDDERS = (
    MINILM_NAME,
    STATIC_EMBEDDER_NAME,
    "all-MiniLM-L6-v2-seq128",
    "all-MiniLM-L6-v2-seq64",
    "all-MiniLM-L6-v2-int8",
    "all-MiniLM-L6-v2-int8-seq128",
)
_VARIANT = re.compile(re.escape(MINILM_NAME) + r"(-int8)?(?:-seq(\d+))?")


def variant_name(max_seq_length: int | None, int8: bool) -> str:
    """The name of MiniLM read up to `max_seq_length` tokens and/or quantised to int8."""
    return (
        MINILM_NAME
        + ("-int8" if int8 else "")
        + ("" if max_seq_length is None else f"-seq{max_seq_length}")
    )


def minilm_variant(name: str) -> tuple[int | None, bool] | None:
    """(max_seq_length, int8) of a "all-MiniLM-L6-v2[-int8][-seqN]" variant name.

    None for any other name, the full model's own name included: it is no variant.
    """
    match = _VARIANT.fullmatch(name)
    if match is None or not (match.group(1) or match.group(2)):
        return None
    length = None if match.group(2) is None else int(match.group(2))
    return length, match.group(1) is not None


def is_known_embedder(name: str) -> bool:
    """Whether `make_embedder(name)` would know the name (nothing is loaded)."""
    return name in (MINILM_NAME, STATIC_EMBEDDER_NAME) or minilm_variant(name) is not None

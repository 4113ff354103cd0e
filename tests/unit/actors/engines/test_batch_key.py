"""Which requests may share a batch: one `generate` call has one decoding setting."""

from __future__ import annotations

from dataclasses import replace

from actors.engines.base import ChatMessage, GenerationRequest, batch_key

BASE = GenerationRequest((ChatMessage("user", "hi"),), max_tokens=8)
SAMPLED = replace(BASE, temperature=0.8)


def test_equal_settings_share_a_key_whatever_the_prompt_or_budget() -> None:
    other = replace(BASE, messages=(), prompt="Once upon a time", max_tokens=4, stop=("x",))
    assert batch_key(BASE) == batch_key(other)
    assert batch_key(SAMPLED) == batch_key(replace(SAMPLED, max_tokens=3))


def test_each_decoding_field_separates_batches() -> None:
    for changed in (
        replace(BASE, repetition_penalty=1.2),
        replace(BASE, min_tokens=3),
        replace(BASE, ignore_eos=True),
    ):
        assert batch_key(changed) != batch_key(BASE)
    for changed in (replace(SAMPLED, top_k=5), replace(SAMPLED, min_p=0.1)):
        assert batch_key(changed) != batch_key(SAMPLED)


def test_ignore_eos_suppresses_the_end_for_the_whole_budget() -> None:
    assert replace(BASE, ignore_eos=True).min_new_tokens == 8
    assert replace(BASE, min_tokens=3).min_new_tokens == 3
    assert replace(BASE, min_tokens=30).min_new_tokens == 8
    # Rows that ignore EOS share a batch only with the same budget.
    assert batch_key(replace(BASE, ignore_eos=True)) != batch_key(
        replace(BASE, ignore_eos=True, max_tokens=9)
    )
    assert batch_key(replace(SAMPLED, seed=1)) is None

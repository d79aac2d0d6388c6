"""Ulysses sequence parallelism (``parallel/ulysses.py``) on 2 gloo ranks against one process."""

from __future__ import annotations

import pytest
from tests.launch import script_result, torchrun

TOL = 1e-5


def test_ulysses_forward_backward_equals_one_process():
    """Tiny Llama and Qwen2 (padding, a length the shards must pad, heads that do not split evenly, eager
    attention): logits, loss, gradients, and ``log_probs`` (packed and not) with entropies and gradients."""
    result = script_result(torchrun("ulysses_equivalence.py", 2, timeout=300))
    assert len(result) == 28, result
    for key, value in result.items():
        assert value <= TOL, (key, value)


def test_sp_data_processor_round_trip():
    from lightrft_lightning.parallel.ulysses import SequenceParallelData

    one = SequenceParallelData()
    assert one.preprocess([1, 2]) == [1, 2] and one.postprocess([1, 2]) == [1, 2]

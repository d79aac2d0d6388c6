"""Validation generation with a sharded actor on 2 ranks whose completions end at different steps
(issue 29, risk 10): every rank's forward gathers parameters, so the rank that finished first must keep
joining until all have (``synced_gpus``). Without it the run hangs (the timeout fails the test)."""

from __future__ import annotations

import pytest

from tests.launch import script_result, torchrun


@pytest.mark.parametrize("strategy", ["lightrft_deepspeed_stage_3", "lightrft_fsdp"])
def test_validation_generation_with_ranks_ending_at_different_steps(strategy: str) -> None:
    result = script_result(torchrun("synced_generation.py", 2, strategy, timeout=240))
    early, never = result["ranks"]
    assert early["eos_step"] in (1, 2) and never["eos_step"] == 0  # the ranks stop at different steps
    assert result["steps"] == 1
    for rank in (early, never):  # the sanity check and the end-of-epoch validation, as unsharded
        assert rank["generated"] == [rank["expected"]] * 2

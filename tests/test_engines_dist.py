"""The rollout callback and weight streaming with sharded actors on 2 gloo CPU ranks (each run is
its own torchrun script): LightRFTFSDP (FSDP2) and LightRFTDeepSpeed (ZeRO-3), fp32."""

from __future__ import annotations

import json

import pytest

from tests.launch import torchrun

pytestmark = pytest.mark.multiprocess


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_engine_follows_a_sharded_actor(backend):
    if backend == "deepspeed":
        pytest.importorskip("deepspeed")
    proc = torchrun("engine_trainer.py", 2, backend, timeout=240)
    line = next(line for line in proc.stdout.splitlines() if line.startswith("ENGINE_TRAINER "))
    result = json.loads(line.split(" ", 1)[1])
    # in Trainer.fit: the engine built from the config matches the actor after every push
    assert result["sharded"] and result["pushes"] == 3 and result["max_diff"] <= 1e-6
    assert all(result["changed"]) and result["engines_after_fit"] == 0
    # bare push_weights with an engine on rank 0 only
    assert result["push_max_diff"] <= 1e-6 and result["push_bytes"] == result["full_bytes"]
    assert result["buckets_within_budget"] and result["stale_refused"]
    if backend == "fsdp":
        assert result["row_gather_exact"]  # oversized parameters gathered slice by slice, uneven rows

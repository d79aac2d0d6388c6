"""Training runs of 2 ranks with their rollouts on real vLLM servers: ``LightRFTFSDP`` (FSDP2) with one
server, ``LightRFTDeepSpeed`` ZeRO-3 with two (prompts spread over both, each push broadcast once to both).
Every step, the servers' greedy completions equal the sharded actor's own decode; ``/weight_info`` reports
the learner's step."""

from __future__ import annotations

import pytest

from tests.launch import script_result, torchrun
from tests.vllm.common import save_tiny_served
from tests.vllm.servers import served


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    model = save_tiny_served(str(tmp_path_factory.mktemp("tiny-served")))
    with served(model, count=2, args=["--dtype", "float32"], api_key="test-key") as started:
        yield model, [s.url for s in started]


@pytest.mark.parametrize("backend,count", [("fsdp", 1), ("deepspeed", 2)])
def test_two_sharded_ranks_train_with_rollouts_on_servers(backend, count, servers):
    model, urls = servers
    result = script_result(torchrun("server_trainer.py", 2, backend, model, ",".join(urls[:count]), timeout=400))
    print(f"FIGURE {backend} 2 ranks, {count} server(s): greedy prompts matched {result['prompts_matched']}/"
          f"{result['prompts_total']}, max logprob diff {result['max_logprob_diff']:.3g}")
    assert result["prompts_matched"] == result["prompts_total"] == 18  # 2 ranks x 3 steps x 3 prompts
    assert result["max_logprob_diff"] < 1e-4
    # pushed before each of the 3 rollouts, tagged with the learner's step (0, 1, 2)
    assert all(r["pushes"] == 3 and r["versions"] == ["2"] * count for r in result["ranks"])

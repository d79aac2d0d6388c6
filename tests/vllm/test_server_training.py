"""Training runs of 2 ranks with their rollouts on real vLLM servers (the session's two tiny servers,
``tiny_servers`` in conftest.py):

* GRPO from the example YAML (``examples/grpo_smollm2_vllm_server.yaml``: ``LightRFTFSDP``, FSDP2) with one
  server, through LightningCLI, the engine built by the callback from ``engine_type: vllm_server``;
* ``LightRFTDeepSpeed`` ZeRO-3 with two servers (prompts spread over both, each push broadcast once to both):
  every step the servers' greedy completions equal the sharded actor's own decode;
* a server that dies: an error naming its URL (this kills the second server: it runs last).

``/weight_info`` reports the learner's step of the last push."""

from __future__ import annotations

import math

import pytest
import requests

from lightrft_lightning.engines.base import SamplingParams
from lightrft_lightning.engines.server import ServerError, VLLMServerEngine
from tests.launch import script_result, torchrun
from tests.vllm.common import cli_fit_rows
from tests.vllm.conftest import SERVER_KEY


def weight_version(url: str) -> str:
    return requests.get(f"{url}/weight_info", headers={"Authorization": f"Bearer {SERVER_KEY}"},
                        timeout=10).json()["weight_version"]


@pytest.mark.parametrize("lora", [None, "adapter"])
def test_grpo_from_the_example_yaml_on_two_fsdp_ranks_with_one_server(lora, tiny_servers, tmp_path):
    """Full weights; and a LoRA actor with adapter-only sync (a learning rate that moves the adapter far enough
    for a server generating without it to show in the engine/learner log-prob gap)."""
    model, servers = tiny_servers
    url = servers[0].url
    extra = ["--model.init_args.lora={r: 8, alpha: 16}", "--model.init_args.actor_learning_rate=0.05"] if lora else []
    rows = cli_fit_rows(
        "grpo_smollm2_vllm_server", tmp_path, f"--model.init_args.model={model}",
        "--model.init_args.apply_chat_template=false", "--model.init_args.max_new_tokens=8", "--trainer.max_steps=2",
        "--data.batch_size=2",
        f"--trainer.callbacks.init_args.engine_kwargs={{urls: [{url}], api_key: {SERVER_KEY}, timeout_s: 120"
        + (f", lora: {lora}}}" if lora else "}"), *extra, timeout=400)
    print(f"FIGURE GRPO FSDP2 2 ranks, 1 server, lora={lora}: engine/learner |logp diff| "
          f"{[float(r['mismatch/logp_abs_diff']) for r in rows]}, push s {[float(r['rollout/sync_s']) for r in rows]}")
    assert [int(r["step"]) for r in rows] == [0, 1]
    from transformers import AutoModelForCausalLM

    tiny = AutoModelForCausalLM.from_pretrained(model)
    if lora:  # the adapter only: r x (in + out) per adapted projection, 7 per layer
        sent = 4 * 8 * sum(m.in_features + m.out_features for n, m in tiny.named_modules() if n.endswith(
            ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")))
    else:
        sent = sum(4 * p.numel() for p in tiny.parameters())  # tied: embed_tokens once
    assert [float(r["rollout/sync_bytes"]) for r in rows] == [sent, sent]  # fp32
    # the server's log-probs are the learner's own (fp32 both): the pushed weights are the actor's
    assert all(float(r["mismatch/logp_abs_diff"]) < 1e-4 and math.isfinite(float(r["loss/policy"])) for r in rows)
    assert weight_version(url) == "1"  # the last push carried the learner's step (1)


def test_two_zero3_ranks_train_with_rollouts_on_two_servers(tiny_servers):
    model, servers = tiny_servers
    urls = [s.url for s in servers]
    result = script_result(torchrun("server_trainer.py", 2, "deepspeed", model, ",".join(urls), timeout=400))
    print(f"FIGURE ZeRO-3 2 ranks, 2 servers: greedy prompts matched {result['prompts_matched']}/"
          f"{result['prompts_total']}, max logprob diff {result['max_logprob_diff']:.3g}")
    assert result["prompts_matched"] == result["prompts_total"] == 12  # 2 ranks x 2 steps x 3 prompts
    assert result["max_logprob_diff"] < 1e-4
    # pushed before each of the 2 rollouts, tagged with the learner's step (0, 1)
    assert all(r["pushes"] == 2 and r["versions"] == ["1", "1"] for r in result["ranks"])


def test_a_server_that_dies_is_a_clear_error_naming_its_url(tiny_servers):
    server = tiny_servers[1][1]
    engine = VLLMServerEngine([server.url], api_key=SERVER_KEY, timeout_s=30)
    assert len(engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=4))[0].token_ids) == 4
    server.kill()
    with pytest.raises(ServerError, match=f"vLLM server {server.url}: POST /v1/completions failed: cannot connect"):
        engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=4))
    engine.close()

"""Training runs of 2 ranks with their rollouts on real vLLM servers (the session's two tiny servers,
``tiny_servers`` in conftest.py):

* GRPO from the example YAML (``examples/grpo_smollm2_vllm_server.yaml``: ``LightRFTFSDP``, FSDP2) with one
  server, through LightningCLI, the engine built by the callback from ``engine_type: vllm_server``;
* ``LightRFTDeepSpeed`` ZeRO-3 with two servers (prompts spread over both, each push broadcast once to both)
  and with one (a LoRA actor, adapter only), FSDP2 with two (LoRA merged): every step the servers' greedy
  completions equal the sharded actor's own decode;
* a server that dies mid-run: an error naming its URL, and the last checkpoint whole (this kills the second
  server: it runs last).

``/weight_info`` reports the learner's step of the last push."""

from __future__ import annotations

import math
import re

import pytest
import requests
import torch

from lightrft_lightning.engines.base import SamplingParams
from lightrft_lightning.engines.server import ServerError, VLLMServerEngine
from tests.launch import ROOT, script_result, torchrun
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
    full = sum(4 * p.numel() for p in tiny.parameters())  # fp32; tied: embed_tokens once
    if lora:  # the adapter only: r x (in + out) per adapted projection, 7 per layer; the first sync adds the base
        adapter = 4 * 8 * sum(m.in_features + m.out_features for n, m in tiny.named_modules() if n.endswith(
            ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")))
        assert [float(r["rollout/sync_bytes"]) for r in rows] == [full + adapter, adapter]
    else:
        assert [float(r["rollout/sync_bytes"]) for r in rows] == [full, full]
    # the server's log-probs are the learner's own (fp32 both): the pushed weights are the actor's
    assert all(float(r["mismatch/logp_abs_diff"]) < 1e-4 and math.isfinite(float(r["loss/policy"])) for r in rows)
    assert weight_version(url) == "1"  # the last push carried the learner's step (1)


@pytest.mark.parametrize("backend,count,weights", [("deepspeed", 2, "full"), ("deepspeed", 1, "adapter"),
                                                  ("fsdp", 2, "merged")])
def test_two_ranks_train_with_rollouts_on_servers(backend, count, weights, tiny_servers):
    """With the example test above: FSDP2 and ZeRO-3 each with one server and with two, a LoRA actor's adapter
    alone (ZeRO-3) and merged (FSDP2); every step the servers' greedy completions equal the sharded actor's."""
    model, servers = tiny_servers
    urls = [s.url for s in servers[:count]]
    result = script_result(torchrun("server_trainer.py", 2, backend, model, ",".join(urls), weights, timeout=400))
    print(f"FIGURE {backend} 2 ranks, {count} server(s), {weights} weights: greedy prompts matched "
          f"{result['prompts_matched']}/{result['prompts_total']}, max logprob diff {result['max_logprob_diff']:.3g}")
    assert result["prompts_matched"] == result["prompts_total"] == 12  # 2 ranks x 2 steps x 3 prompts
    assert result["max_logprob_diff"] < 1e-4
    # pushed before each of the 2 rollouts, tagged with the learner's step (0, 1)
    assert all(r["pushes"] == 2 and r["versions"] == ["1"] * count for r in result["ranks"])


def test_a_server_that_dies_mid_run_is_an_error_naming_its_url_and_the_last_checkpoint_loads(tiny_servers, tmp_path):
    """GRPO under a Trainer with a DCP checkpoint every step; the server dies after step 1: the next rollout
    raises an error naming its URL, and the step-1 checkpoint (written after the kill) is whole and holds
    the weights the actor ended with. Kills the second server: this test runs last."""
    import lightning.pytorch as pl

    from lightrft_lightning import LightRFTFake
    from lightrft_lightning.algorithms import GRPO
    from lightrft_lightning.callbacks import DCPCheckpoint, RolloutEngineCallback
    from lightrft_lightning.checkpoint import dcp
    from lightrft_lightning.data import PromptDataModule

    model, servers = tiny_servers
    server = servers[1]

    class KillAfterFirstStep(pl.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == 1:
                server.kill()

    module = GRPO(model=model, apply_chat_template=False, rewards={"lightrft_lightning.tasks:arithmetic_reward": 1.0},
                  n_samples_per_prompt=2, max_new_tokens=4, micro_train_batch_size=2, actor_learning_rate=0.05)
    engine = RolloutEngineCallback(engine_kwargs={"urls": [server.url], "api_key": SERVER_KEY, "timeout_s": 30})
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=LightRFTFake({"engine_type": "vllm_server"}),
                         max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[engine, DCPCheckpoint(tmp_path, every_n_train_steps=1), KillAfterFirstStep()])
    data = PromptDataModule(path=str(ROOT / "examples/data/arithmetic_train.jsonl"), batch_size=1)
    # the next step's weight push (or rollout) is the first request to fail
    with pytest.raises(ServerError, match=f"vLLM server {re.escape(server.url)}: POST /[a-z_/0-9]+ failed: cannot connect"):
        trainer.fit(module, data)
    path = dcp.resolve(str(tmp_path))
    assert path.endswith("global_step1")
    saved = dcp.read_state_dict(path)  # verified against the CRCs saved with it
    actor = module.actor.state_dict()
    assert all(torch.equal(saved[f"actor.{k}"], v) for k, v in actor.items())

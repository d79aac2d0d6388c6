"""`VLLMServerEngine` against real vLLM servers (``lightrft-lightning serve`` on 127.0.0.1, free ports), the
weights pushed through vLLM's weight-transfer protocol with our gloo backend (loaded as a plugin).

The session's two tiny tied model servers (``tiny_servers`` in conftest.py: fp32, API key) serve it; this
module uses the first (tests/vllm/test_server_training.py uses both, and kills the second at its end)."""

from __future__ import annotations

import time

import pytest
import requests
import torch

from lightrft_lightning.engines.base import SamplingParams
from lightrft_lightning.engines.server import ServerError, VLLMServerEngine
from lightrft_lightning.engines.weight_sync import plan_buckets, push_weights
from lightrft_lightning.tiny_models import tiny_causal_lm
from tests.vllm.common import TINY, greedy, max_logprob_diff
from tests.vllm.conftest import SERVER_KEY as KEY

PROMPTS = [[5, 6, 7], [9, 10, 11, 12], [20, 21]]


@pytest.fixture(scope="module")
def server(tiny_servers):
    return tiny_servers[1][0]


def test_push_from_an_actor_makes_greedy_equal_with_buckets_that_split_layers(server):
    engine = VLLMServerEngine([server.url], api_key=KEY, timeout_s=120)
    actor = tiny_causal_lm(seed=3, **TINY)
    bucket_bytes = 40_000  # a decoder layer is ~230 kB: every layer spans several buckets
    assert len(plan_buckets(actor, bucket_bytes)) > 2 * TINY["num_hidden_layers"]
    before = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=8, stop_at_eos=False))
    moved = push_weights(actor, engine, bucket_bytes)
    assert moved == sum(p.numel() * 4 for p in actor.parameters())  # tied: embed_tokens travels once
    out = engine.generate(PROMPTS, SamplingParams(n=2, temperature=0.0, max_new_tokens=8, stop_at_eos=False))
    ref = greedy(actor, PROMPTS, 8)
    assert [c.token_ids for c in out] == [r for r in ref for _ in range(2)]
    assert [c.token_ids for c in before] != ref
    assert max_logprob_diff(actor, PROMPTS, out) < 1e-4
    assert engine.weight_versions() == ["1"]
    with torch.no_grad():
        for p in actor.parameters():
            p.mul_(1.5)
    push_weights(actor, engine, bucket_bytes)
    out = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=8, stop_at_eos=False))
    assert [c.token_ids for c in out] == greedy(actor, PROMPTS, 8) and engine.weight_versions() == ["2"]
    assert requests.get(f"{server.url}/is_paused", headers={"Authorization": f"Bearer {KEY}"}).json() == \
        {"is_paused": False}


def test_adapter_only_sync_generates_with_the_trained_adapter(server):
    """``lora="adapter"``: only the LoRA parameters travel (a peft directory the server loads), and the server's
    greedy completions equal the merged actor's; a second push replaces the adapter; versions are the steps. The
    server starts with another model's weights: the engine's first sync sends the frozen base too."""
    import copy

    from lightrft_lightning.lora import LoRASettings, apply_lora, lora_layers

    push_weights(tiny_causal_lm(seed=7, **TINY), VLLMServerEngine([server.url], api_key=KEY), 1 << 20)  # not the base
    base = tiny_causal_lm(seed=6, **TINY)
    base_bytes = sum(4 * p.numel() for p in base.parameters())
    actor = apply_lora(base, LoRASettings(r=8, alpha=16), "test")
    engine = VLLMServerEngine([server.url], api_key=KEY, lora="adapter")
    greedy_params = SamplingParams(temperature=0.0, max_new_tokens=8, stop_at_eos=False)

    def merged_greedy():
        merged = copy.deepcopy(actor).eval()
        for _, layer in lora_layers(merged):
            layer.merge()
        return greedy(merged, PROMPTS, 8)

    seen = []
    for step in (3, 4):
        with torch.no_grad():
            for name, p in actor.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.3, generator=torch.Generator().manual_seed(step))
        engine.tag_weight_version(step)
        moved = push_weights(actor, engine, 1 << 20)
        adapter = sum(4 * p.numel() for n, p in actor.named_parameters() if "lora_" in n)
        assert moved == adapter + (base_bytes if step == 3 else 0)  # then the adapter only
        out = [c.token_ids for c in engine.generate(PROMPTS, greedy_params)]
        assert out == merged_greedy() and engine.weight_versions() == [str(step)]
        seen.append(out)
    assert seen[0] != seen[1] and engine.adapter == "lightrft-v4"
    models = requests.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
    assert [m["id"] for m in models["data"] if m["id"].startswith("lightrft-")] == ["lightrft-v4"]  # v3 unloaded
    engine.close()


def test_sampling_returns_ids_logprobs_and_finish_reasons_per_prompt(server):
    engine = VLLMServerEngine([server.url], api_key=KEY)
    out = engine.generate(PROMPTS, SamplingParams(n=3, temperature=1.0, max_new_tokens=5, seed=7))
    assert [c.prompt_index for c in out] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(len(c.token_ids) == len(c.logprobs) == 5 and c.finish_reason == "length" for c in out)
    assert all(all(lp <= 0 for lp in c.logprobs) for c in out)
    again = engine.generate(PROMPTS, SamplingParams(n=3, temperature=1.0, max_new_tokens=5, seed=7))
    assert [c.token_ids for c in again] == [c.token_ids for c in out]  # seeded


def test_every_route_but_health_refuses_a_request_without_the_key(server):
    for method, path in (("post", "/update_weights"), ("post", "/collective_rpc"), ("post", "/pause"),
                         ("get", "/weight_info"), ("post", "/v1/completions"), ("post", "/sleep")):
        response = getattr(requests, method)(f"{server.url}{path}", json={}, timeout=10)
        assert response.status_code == 401, (path, response.status_code)
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200
    with pytest.raises(ServerError, match=f"vLLM server {server.url}: GET /v1/models was refused \\(401"):
        VLLMServerEngine([server.url], api_key="wrong")


def test_a_slow_answer_is_a_timeout_error_naming_the_url(server):
    """A server that does not answer in time (paused: vLLM schedules no new request until it resumes, so the
    request waits however fast the machine is) is an error naming the URL, raised at the timeout."""
    engine = VLLMServerEngine([server.url], api_key=KEY, timeout_s=0.5)
    auth = {"Authorization": f"Bearer {KEY}"}
    assert requests.post(f"{server.url}/pause", params={"mode": "keep"}, headers=auth, timeout=30).ok
    try:
        start = time.monotonic()
        with pytest.raises(ServerError, match=f"vLLM server {server.url}: POST /v1/completions timed out after 0.5 s"):
            engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=4))
        assert time.monotonic() - start < 5
    finally:
        assert requests.post(f"{server.url}/resume", headers=auth, timeout=30).ok
    engine.close()


def test_lightrft_engine_calls_build_a_server_engine_and_follow_the_trained_actor(server):
    """LightRFT's calls (``setup_inference_engine``, ``update_engine_weights``, ``gather_and_generate``) on the
    fake strategy with ``engine_type="vllm_server"``: the one builder makes the server engine, every push is
    tagged with the strategy's optimizer step, and the server's greedy completions follow the trained actor."""
    import argparse

    from torch import nn

    from lightrft_lightning import get_fake_strategy

    class Actor(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, ids):
            return self.model(input_ids=ids, labels=ids).loss

    args = argparse.Namespace(engine_type="vllm_server", micro_train_batch_size=1, train_batch_size=1,
                              actor_learning_rate=5e-2)
    s = get_fake_strategy(args)
    actor = Actor(tiny_causal_lm(seed=4, **TINY))
    (actor, opt, sched), _, _, _ = s.prepare_models_and_optimizers(actor, None, None, None, args, 10)
    engine = s.setup_inference_engine(args, actor=actor, engine_kwargs={"urls": [server.url], "api_key": KEY})
    assert isinstance(engine, VLLMServerEngine) and engine.weight_versions() == ["0"]
    greedy_style = argparse.Namespace(temperature=0.0, max_tokens=6, n=1, top_p=1.0, top_k=-1)

    def follows_the_actor(outs) -> bool:  # a completion may stop at the model's EOS: compare that much
        ref = greedy(actor.model, PROMPTS, 6)
        return all(o.output_token_ids and o.output_token_ids == r[:len(o.output_token_ids)] for o, r in zip(outs, ref))

    outs = s.gather_and_generate(greedy_style, all_prompt_token_ids=PROMPTS)
    assert len(outs) == len(PROMPTS) and follows_the_actor(outs)
    for _ in range(2):
        s.backward(actor(torch.tensor([[5, 6, 7, 40, 40, 40, 40]])), actor, opt)
        s.optimizer_step(opt, actor, sched)
    s.update_engine_weights(actor)
    again = s.gather_and_generate(greedy_style, all_prompt_token_ids=PROMPTS)
    assert follows_the_actor(again) and [o.output_token_ids for o in again] != [o.output_token_ids for o in outs]
    assert engine.weight_versions() == ["2"]  # the strategy's optimizer steps
    engine.close()

"""Multi-turn episodes (MultiTurnRollout) through real vLLM in this process, on real vLLM servers and through
the HF engine: greedy episodes are identical token for token, with the engines' log-probs alike; multi-turn
GRPO under a Trainer with its episodes on the servers trains as with the HF engine."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightrft_lightning.algorithms.episodes import MultiTurnRollout
from lightrft_lightning.engines import SamplingParams, VLLMEngine
from lightrft_lightning.engines.hf import HFEngine
from lightrft_lightning.tokenizer import CHAR_CHAT_TEMPLATE, char_tokenizer
from tests.launch import SCRIPTS
from tests.vllm.common import save_tiny

sys.path.insert(0, str(SCRIPTS))
from multiturn_grpo import Feedback  # noqa: E402  (feedback twice, done on the third turn)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return save_tiny(str(tmp_path_factory.mktemp("tiny_episodes")), seed=1)


def test_greedy_episodes_are_identical_on_hf_and_vllm(model_dir):
    tok = char_tokenizer()
    tok.chat_template = CHAR_CHAT_TEMPLATE
    rollout = MultiTurnRollout(Feedback, max_turns=4, max_new_tokens=6, max_total_tokens=200)
    rollout.bind(tok)
    rows = [{"prompt": "3+4=?"}, {"prompt": "what is 12"}, {"prompt": "9"}]
    greedy = SamplingParams(n=2, temperature=0.0, max_new_tokens=6)
    actor = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf = HFEngine(actor, pad_token_id=0, eos_token_id=1)
    vllm = VLLMEngine(model_dir, dtype="float32", seed=0, eos_token_id=1)
    _, on_hf = rollout.run_episodes(hf.generate, rows, greedy)
    _, on_vllm = rollout.run_episodes(vllm.generate, rows, greedy)
    assert [ep.token_ids for ep in on_hf] == [ep.token_ids for ep in on_vllm]
    assert [ep.loss_mask for ep in on_hf] == [ep.loss_mask for ep in on_vllm]
    assert [ep.finish_reason for ep in on_hf] == [ep.finish_reason for ep in on_vllm] == ["done"] * 6
    assert all(ep.turns == 3 for ep in on_vllm) and [ep.rewards for ep in on_hf] == [ep.rewards for ep in on_vllm]
    gap = max(abs(a - b) for x, y in zip(on_hf, on_vllm) for a, b in zip(x.logprobs, y.logprobs))
    assert gap < 1e-3, gap
    assert sum(map(sum, (ep.loss_mask for ep in on_vllm))) > 0


def test_greedy_episodes_on_a_server_are_the_hf_engines(tiny_servers):
    """The same loop against a real vLLM server (VLLMServerEngine, token ids over HTTP) after a push of the
    actor: episodes equal the HF engine's token for token, over two servers."""
    import string

    from lightrft_lightning.engines.server import VLLMServerEngine
    from lightrft_lightning.engines.weight_sync import push_weights
    from lightrft_lightning.tiny_models import tiny_causal_lm
    from tests.vllm.common import TINY
    from tests.vllm.conftest import SERVER_KEY

    _, servers = tiny_servers
    tok = char_tokenizer(string.printable[:TINY["vocab_size"] - 3])  # the served model's tokenizer
    tok.chat_template = CHAR_CHAT_TEMPLATE
    rollout = MultiTurnRollout(Feedback, max_turns=4, max_new_tokens=6, max_total_tokens=200)
    rollout.bind(tok)
    rows = [{"prompt": "3+4=?"}, {"prompt": "what is 12"}, {"prompt": "9"}]
    greedy = SamplingParams(n=2, temperature=0.0, max_new_tokens=6)
    actor = tiny_causal_lm(seed=0, **TINY).eval()  # the served checkpoint's weights: the servers stay as other tests find them
    server = VLLMServerEngine([s.url for s in servers], api_key=SERVER_KEY, timeout_s=120, eos_token_id=1)
    push_weights(actor, server, 1 << 20)
    _, on_hf = rollout.run_episodes(HFEngine(actor, pad_token_id=0, eos_token_id=1).generate, rows, greedy)
    _, on_server = rollout.run_episodes(server.generate, rows, greedy)
    assert [ep.token_ids for ep in on_hf] == [ep.token_ids for ep in on_server]
    assert [ep.loss_mask for ep in on_hf] == [ep.loss_mask for ep in on_server]
    assert all(ep.turns == 3 for ep in on_server) and [ep.rewards for ep in on_hf] == [ep.rewards for ep in on_server]
    gap = max(abs(a - b) for x, y in zip(on_hf, on_server) for a, b in zip(x.logprobs, y.logprobs))
    assert gap < 1e-3, gap


@pytest.mark.multiprocess
def test_multi_turn_grpo_with_episodes_on_servers_trains_as_with_the_hf_engine(tiny_servers, tmp_path):
    """tests/scripts/multiturn_grpo.py on the served model: 2 FSDP2 ranks under a Trainer, each rank's episodes
    generated on both servers (the actor's weights pushed before each rollout), against one process with the
    HF engine: the same greedy episodes (turns, lengths, rewards) and the same losses, 2 steps."""
    import json

    import multiturn_grpo

    from lightrft_lightning.engines.server import VLLMServerEngine
    from lightrft_lightning.engines.weight_sync import push_weights
    from lightrft_lightning.tiny_models import tiny_causal_lm
    from tests.launch import torchrun
    from tests.vllm.common import TINY
    from tests.vllm.conftest import SERVER_KEY

    model, servers = tiny_servers
    out = tmp_path / "steps.json"
    try:
        torchrun("multiturn_grpo.py", 2, "fsdp", str(out), model, ",".join(s.url for s in servers),
                 env={"PYTHONPATH": str(SCRIPTS.parents[1])}, timeout=400)
    finally:  # the served checkpoint's weights again: the servers stay as other tests find them
        push_weights(tiny_causal_lm(seed=0, **TINY).eval(),
                     VLLMServerEngine([s.url for s in servers], api_key=SERVER_KEY, timeout_s=120), 1 << 20)
    on_servers, one = json.loads(out.read_text()), multiturn_grpo.run("fake", model=model)
    print(f"FIGURE multi-turn GRPO on 2 servers vs HF engine: loss {[s['loss/policy'] for s in on_servers]} vs "
          f"{[s['loss/policy'] for s in one]}, engine/learner |logp diff| {[s['mismatch/logp_abs_diff'] for s in on_servers]}")
    assert len(on_servers) == len(one) == 2 and all(s["episode/turns"] == 3 and s["loss/policy"] != 0 for s in one)
    for got, ref in zip(on_servers, one):  # step 2's episodes come from the weights step 1 made and pushed
        for key in ("loss/policy", "reward", "reward_std", "response_length", "episode/turns"):
            assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key
        assert got["mismatch/logp_abs_diff"] < 1e-4  # the servers' log-probs are the learner's own (fp32 both)

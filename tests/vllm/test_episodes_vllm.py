"""Multi-turn episodes (MultiTurnRollout) through real vLLM in this process and through the HF engine:
greedy episodes are identical token for token, with the engines' log-probs alike."""

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

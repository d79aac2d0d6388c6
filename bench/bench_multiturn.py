"""The cost of the turns: tokens/s of multi-turn episodes against single-turn rollouts that generate the
same number of tokens, on the HF engine and (in .venv-vllm) on vLLM in process.

Multi-turn: ``--turns`` model turns of ``--tokens`` tokens each (EOS off, so every turn has exactly that
many), each answered by a one-line environment message appended as a chat-template suffix. Single-turn:
one turn of ``turns x tokens`` tokens. Same prompts, same number of episodes (``--prompts`` x
``--samples``), the same tiny random model (fp32) and the char tokenizer with a one-line chat template.
Printed: generated tokens/s of each and their ratio (one run, so the ratio holds on a busy machine better
than either number).

    python bench/bench_multiturn.py [--engine hf|vllm|both] [--turns 4] [--tokens 32] [--prompts 8] [--samples 4]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

import torch

from lightrft_lightning.algorithms.environments import Environment, Step
from lightrft_lightning.algorithms.episodes import MultiTurnRollout
from lightrft_lightning.engines.base import SamplingParams
from lightrft_lightning.tiny_models import tiny_causal_lm
from lightrft_lightning.tokenizer import CHAR_CHAT_TEMPLATE, char_tokenizer

# vLLM's CPU kernels need head_dim 64 (tests/vllm/common.py)
CONFIG = dict(vocab_size=96, hidden_size=128, num_attention_heads=2, num_key_value_heads=1, intermediate_size=256,
              num_hidden_layers=2, max_position_embeddings=2048, tie_word_embeddings=True)


class Feedback(Environment):
    """Answers every turn with one short line; never done (the rollout's max_turns ends the episode)."""

    def reset(self, row):
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, completion):
        return Step([{"role": "user", "content": "go on"}])


def engine(kind: str, model_dir: str):
    if kind == "hf":
        from transformers import AutoModelForCausalLM

        from lightrft_lightning.engines.hf import HFEngine
        return HFEngine(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), pad_token_id=0,
                        eos_token_id=1)
    from lightrft_lightning.engines import VLLMEngine
    return VLLMEngine(model_dir, dtype="float32", seed=0, eos_token_id=1)


def tokens_per_s(eng, turns: int, tokens: int, rows: list[dict], samples: int, tok) -> tuple[float, int]:
    rollout = MultiTurnRollout(Feedback, max_turns=turns, max_new_tokens=tokens, max_total_tokens=2048)
    rollout.bind(tok)
    params = SamplingParams(n=samples, temperature=1.0, max_new_tokens=tokens, stop_at_eos=False, seed=0)
    start = time.perf_counter()
    _, episodes = rollout.run_episodes(eng.generate, rows, params)
    seconds = time.perf_counter() - start
    generated = sum(sum(ep.loss_mask) for ep in episodes)
    assert generated == len(rows) * samples * turns * tokens, generated
    return generated / seconds, generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["hf", "vllm", "both"], default="hf")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    tok = char_tokenizer()
    tok.chat_template = CHAR_CHAT_TEMPLATE
    rows = [{"prompt": f"what is {i} + {i + 1}?"} for i in range(args.prompts)]
    with tempfile.TemporaryDirectory() as model_dir:
        tiny_causal_lm(seed=0, **CONFIG).save_pretrained(model_dir)
        for kind in (["hf", "vllm"] if args.engine == "both" else [args.engine]):
            eng = engine(kind, model_dir)
            tokens_per_s(eng, 1, 4, rows[:1], 1, tok)  # warm-up
            multi, single = [], []
            for _ in range(args.repeats):  # interleaved, so that load changes hit both alike
                multi.append(tokens_per_s(eng, args.turns, args.tokens, rows, args.samples, tok)[0])
                single.append(tokens_per_s(eng, 1, args.turns * args.tokens, rows, args.samples, tok)[0])
            m, s = max(multi), max(single)
            print(f"{kind}: {args.prompts} prompts x {args.samples} episodes, {args.turns} turns x {args.tokens} tokens "
                  f"vs 1 turn x {args.turns * args.tokens}: multi-turn {m:.0f} tok/s, single-turn {s:.0f} tok/s, "
                  f"ratio {m / s:.2f} (best of {args.repeats})")


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    main()

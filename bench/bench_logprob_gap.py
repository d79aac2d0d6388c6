"""Engine vs learner log-prob gap on the real SmolLM2-135M-Instruct: for each engine (``HFEngine``,
real ``VLLMEngine``) in fp32 and bf16, sample completions of chat-rendered arithmetic prompts at
temperature 0.7, then score them with the fp32 learner (``log_probs`` at the same temperature, the
path GRPO trains on) and compare with the engine's ``Completion.logprobs``: mean and max ``|diff|``,
the k3 estimate of KL(engine || learner), the largest ratio learner / engine, and the share of tokens a
TIS cap of 2 would truncate. One process per vLLM engine. vLLM runs from the vLLM venv:

    .venv-vllm/bin/python bench/bench_logprob_gap.py [--engines hf vllm] [--prompts 8] [--n 4] [--new 32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TEMPERATURE = 0.7


def measure(engine_type: str, dtype: str, prompts: int, n: int, new: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightrft_lightning import pretrained
    from lightrft_lightning.algorithms.log_probs import log_probs
    from lightrft_lightning.algorithms.losses import rollout_correction
    from lightrft_lightning.algorithms.rollout import engine_log_probs
    from lightrft_lightning.data import render_prompts
    from lightrft_lightning.engines import SamplingParams
    from lightrft_lightning.tasks import arithmetic_problems

    torch.manual_seed(0)
    model_dir = pretrained.resolve("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(model_dir)
    actor = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    _, ids = render_prompts(arithmetic_problems(prompts, seed=1), tok, apply_chat_template=True)
    if engine_type == "hf":
        from lightrft_lightning.engines import HFEngine
        from lightrft_lightning.engines.weight_sync import push_weights

        engine = HFEngine.from_config(actor.config, dtype=getattr(torch, dtype), pad_token_id=tok.pad_token_id)
        push_weights(actor, engine, bucket_bytes=64 << 20)
    else:
        from lightrft_lightning.engines import VLLMEngine

        engine = VLLMEngine(model_dir, dtype=dtype, seed=0, enforce_eager=True, max_model_len=1024)
    out = engine.generate(ids, SamplingParams(n=n, temperature=TEMPERATURE, max_new_tokens=new, seed=0))
    seqs = [ids[c.prompt_index] + c.token_ids for c in out]
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), tok.pad_token_id)
    attention = torch.zeros_like(input_ids)
    action = torch.zeros(len(seqs), width - 1)
    for i, (seq, c) in enumerate(zip(seqs, out)):
        input_ids[i, :len(seq)] = torch.tensor(seq)
        attention[i, :len(seq)] = 1
        action[i, len(ids[c.prompt_index]) - 1:len(seq) - 1] = 1
    with torch.no_grad():
        learner = torch.cat([log_probs(actor, input_ids[i:i + 4], attention[i:i + 4], TEMPERATURE,
                                       action_mask=action[i:i + 4])[0] for i in range(0, len(seqs), 4)])
    mu = engine_log_probs(out, action)
    _, m = rollout_correction(learner, mu, action, is_level="token", is_threshold=2.0)
    diff = ((learner - mu).abs() * action)
    return {"engine": engine_type, "dtype": dtype, "tokens": int(action.sum()), "mean_abs_diff": m["logp_abs_diff"].item(),
            "max_abs_diff": diff.max().item(), "kl": m["kl"].item(), "ratio_max": m["ratio_max"].item(),
            "tis2_truncated": m["tokens_truncated"].item()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engines", nargs="+", default=["hf", "vllm"])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--case", nargs=2)
    args = parser.parse_args()
    if args.case:
        torch.set_num_threads(2)
        print("CASE " + json.dumps(measure(*args.case, args.prompts, args.n, args.new)), flush=True)
        os._exit(0)  # skip vLLM's exit hooks
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    rows = []
    for engine in args.engines:
        for dtype in ("float32", "bfloat16"):
            proc = subprocess.run([sys.executable, __file__, "--case", engine, dtype, "--prompts", str(args.prompts),
                                   "--n", str(args.n), "--new", str(args.new)], capture_output=True, text=True, env=env)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("CASE ")]
            if not lines:
                print(f"{engine} {dtype} failed:\n{proc.stderr[-3000:]}")
                continue
            rows.append(json.loads(lines[-1][5:]))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nSmolLM2-135M-Instruct, fp32 learner, temperature {TEMPERATURE}, {args.prompts} prompts x {args.n}, "
          f"<= {args.new} new tokens")
    print("| engine | engine dtype | tokens | mean abs diff | max abs diff | KL(mu||pi_old) k3 | max ratio | TIS C=2 truncated |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['dtype']} | {r['tokens']} | {r['mean_abs_diff']:.3g} | {r['max_abs_diff']:.3g} | "
              f"{r['kl']:.3g} | {r['ratio_max']:.4g} | {r['tis2_truncated']:.3g} |")


if __name__ == "__main__":
    main()

"""A real ``VLLMEngine`` (fp32) on SmolLM2-135M-Instruct samples at temperature 0.7, plain and with top-p 0.8;
the fp32 learner's ``log_probs`` at 0.7 score the same tokens. Prints ``RESULT {json}``: the gaps.

    PYTHONPATH=. python tests/scripts/vllm_logprobs_real.py
"""

from __future__ import annotations

import os
import warnings

import torch

from lightrft_lightning import pretrained
from lightrft_lightning.algorithms.log_probs import log_probs
from lightrft_lightning.engines import SamplingParams, VLLMEngine
from tests.launch import report
from tests.vllm.common import set_env


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightrft_lightning.data import render_prompts

    model_dir = pretrained.resolve("smollm2-135m-instruct")
    actor = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    _, ids = render_prompts([{"prompt": "What is 12 + 7?"}], AutoTokenizer.from_pretrained(model_dir),
                            apply_chat_template=True)
    prompt = ids[0]
    engine = VLLMEngine(model_dir, dtype="float32", seed=0, enforce_eager=True, max_model_len=512)
    gaps = {}
    for name, top_p in (("plain", 1.0), ("top_p", 0.8)):
        out = engine.generate([prompt], SamplingParams(n=2, temperature=0.7, top_p=top_p, max_new_tokens=10,
                                                       stop_at_eos=False, seed=1))
        seqs = torch.tensor([prompt + c.token_ids for c in out])
        with torch.no_grad():
            learner = log_probs(actor, seqs, torch.ones_like(seqs), 0.7)[0][:, len(prompt) - 1:]
        diff = torch.tensor([c.logprobs for c in out]) - learner  # engine - learner
        gaps[name] = {"mean_abs": diff.abs().mean().item(), "max_abs": diff.abs().max().item(),
                      "min": diff.min().item(), "max": diff.max().item(), "tokens": diff.numel()}
    report(gaps)


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    set_env()
    torch.set_num_threads(2)
    main()
    os._exit(0)  # skip vLLM's exit hooks

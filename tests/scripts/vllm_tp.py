"""One ``VLLMEngine`` with ``tensor_parallel_size=2`` over 2 CPU ranks (external_launcher): each rank
asks for its own prompts (the adapter gathers them, since the ranks of a tensor-parallel engine must
submit the same requests), after a push of trained weights; greedy n=2 against the actor's own decode.
Then the same prompts through a LightRFT strategy's ``gather_and_generate`` (``engine_tp_size=2``): the
engine must generate each prompt of the group once, as the direct call does (it once gathered them
twice: tp^2 times the prompts).

    PYTHONPATH=. torchrun --nproc_per_node=2 tests/scripts/vllm_tp.py MODEL_DIR
"""

import glob
import os
import sys
import warnings

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from lightrft_lightning import StrategyConfig
from lightrft_lightning.engines import SamplingParams, VLLMEngine, push_weights
from lightrft_lightning.strategies.fsdp import LightRFTFSDP
from tests.launch import report
from tests.vllm.common import greedy, max_logprob_diff, set_env

NEW = 8


def main(model_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    actor = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for i, p in enumerate(actor.parameters()):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.05)
    engine = VLLMEngine(model_dir, dtype="float32", tensor_parallel_size=2, enforce_eager=True)
    push_weights(actor, engine, bucket_bytes=20_000)
    submitted: list[int] = []  # prompts per vllm.LLM.generate call
    llm_generate = engine.llm.generate
    engine.llm.generate = lambda prompts, *a, **k: (submitted.append(len(prompts)), llm_generate(prompts, *a, **k))[1]
    prompts = [[5 + rank, 6, 7], [9, 10 + 2 * rank, 11, 12], [40 + rank]][: 2 + rank]  # 2 and 3 prompts
    out = engine.generate(prompts, SamplingParams(n=2, temperature=0.0, max_new_tokens=NEW, stop_at_eos=False))
    strategy = LightRFTFSDP(StrategyConfig(fsdp=True, bf16=False, engine_tp_size=2))
    strategy.setup_distributed()  # the process group exists: builds the engine groups
    strategy.inference_engine = engine
    lightrft = strategy.gather_and_generate({"n": 2, "temperature": 0.0, "max_tokens": NEW, "stop_at_eos": False},
                                            all_prompt_token_ids=prompts)
    ref = greedy(actor, prompts, NEW)
    local = {"matched": sum(out[2 * i].token_ids == ref[i] == out[2 * i + 1].token_ids for i in range(len(prompts))),
             "prompts": len(prompts), "completions": len(out), "max_diff": max_logprob_diff(actor, prompts, out),
             "tp": engine.llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size,
             "submitted": submitted, "lightrft_same": [o.output_token_ids for o in lightrft] == [c.token_ids for c in out]}
    gathered = [None] * 2
    dist.all_gather_object(gathered, local)
    report({"ranks": gathered})  # every rank meets there
    if rank == 0:  # os._exit skips vLLM's teardown: free its CPU shared-memory segments, or the next run's
        # engine (same names: "<VLLM_DIST_IDENT>-tp:0-[0-1]-cpushm_<rank>") fails with errno 17 (EEXIST)
        ident = os.environ.get("VLLM_DIST_IDENT", "").lstrip("/")  # "//" under the external launcher
        for path in glob.glob(os.path.join("/dev/shm", glob.escape(ident) + "-*cpushm*")):
            os.remove(path)
    assert all(r["matched"] == r["prompts"] and r["completions"] == 2 * r["prompts"] and r["tp"] == 2
               and r["max_diff"] < 1e-4 and r["submitted"] == [5, 5] and r["lightrft_same"] for r in gathered), gathered


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    set_env()
    main(sys.argv[1])
    os._exit(0)

"""Rollout-engine benchmarks on CPU, printed as one table of ratios measured in this run.

1. Weight sync from an FSDP2-sharded actor (2 gloo ranks, an HFEngine on each rank): the bucketed
   stream (``push_weights``) vs gathering a full state dict first (``get_model_state_dict(...,
   full_state_dict=True)`` then ``update_weights``). Peak extra memory is the rise of the process's
   resident-set high-water mark over the resident set before the sync (the mark is reset through
   /proc/self/clear_refs; glibc's mmap threshold is pinned so freed tensors leave the resident set).
2. Generation throughput of ``HFEngine.generate`` vs ``model.generate`` on the same left-padded batch,
   same sampling settings and the same number of new tokens, best of 5 interleaved runs each.
Times are the best of their repeats, so load from other processes on the machine disturbs them least.

    python bench/bench_engines.py [--bucket-mb 16] [--layers 8]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightrft_lightning.engines import HFEngine, SamplingParams, push_weights  # noqa: E402
from lightrft_lightning.tiny_models import tiny_qwen2_config  # noqa: E402


def bench_config(layers: int):
    # ~75M parameters; the largest tensor (an embedding) is ~1/6 of the model, as in real LLMs' order of magnitude
    return tiny_qwen2_config(vocab_size=16384, hidden_size=768, num_hidden_layers=layers, num_attention_heads=12,
                             num_key_value_heads=4, intermediate_size=2048, max_position_embeddings=512)


def _status(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


# ---------------------------------------------------------------------------- sync worker (torchrun)
def sync_worker(mode: str, bucket_bytes: int, layers: int) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import Qwen2ForCausalLM

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    config = bench_config(layers)
    with torch.device("meta"):
        actor = Qwen2ForCausalLM(config)
    for layer in actor.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(actor, mesh=mesh)
    actor.to_empty(device="cpu")
    with torch.no_grad():
        for p in actor.parameters():
            p.to_local().normal_(std=0.02)
    engine = HFEngine.from_config(config, pad_token_id=0, dtype=torch.float32, device="cpu")

    def sync() -> int:
        if mode == "bucketed":
            return push_weights(actor, engine, bucket_bytes, dtype=torch.float32)
        state = get_model_state_dict(actor, options=StateDictOptions(full_state_dict=True))
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        engine.update_weights(list(state.items()))
        engine.finish_weight_update()
        del state
        return nbytes

    sync()  # warm up (first-touch of the engine's pages, gloo buffers)
    times, extras = [], []
    for _ in range(3):
        gc.collect()
        dist.barrier()
        before = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        start = time.perf_counter()
        nbytes = sync()
        times.append(time.perf_counter() - start)
        extras.append(_status("VmHWM") - before)
    peak = torch.tensor([max(extras)], dtype=torch.float64)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    params = sum(p.numel() for p in actor.parameters())
    largest = max(p.numel() for p in actor.parameters()) * 4
    if dist.get_rank() == 0:
        print("SYNC " + json.dumps({"mode": mode, "time_s": min(times), "peak_extra": peak.item(),
                                    "bytes": nbytes, "params": params, "largest_param_bytes": largest}), flush=True)
    dist.destroy_process_group()


def run_sync(mode: str, bucket_bytes: int, layers: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={29500 + os.getpid() % 1000 + (mode == 'naive')}", __file__, "--sync-worker", mode,
           "--bucket-mb", str(bucket_bytes >> 20), "--layers", str(layers)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("SYNC ")), None)
    if line is None:
        raise RuntimeError(f"sync worker {mode} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line[5:])


# ---------------------------------------------------------------------------- generation
def bench_generation(layers: int, batch: int = 8, new_tokens: int = 32, repeats: int = 5) -> dict:
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(bench_config(layers)).eval()
    engine = HFEngine(model, pad_token_id=0, eos_token_id=None)
    prompts = [torch.randint(1, 16384, (16 + 2 * i,)).tolist() for i in range(batch)]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    params = SamplingParams(temperature=1.0, max_new_tokens=new_tokens, stop_at_eos=False, seed=0)

    def run_engine() -> int:
        return sum(len(c.token_ids) for c in engine.generate(prompts, params))

    def run_hf() -> int:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                                 eos_token_id=None)
        return (out.shape[1] - width) * batch

    run_engine(), run_hf()  # warm up
    rates: dict[str, list[float]] = {"engine": [], "hf": []}
    for _ in range(repeats):  # interleaved, so background load hits both alike
        for name, fn in (("engine", run_engine), ("hf", run_hf)):
            start = time.perf_counter()
            tokens = fn()
            rates[name].append(tokens / (time.perf_counter() - start))
    return {name: max(r) for name, r in rates.items()}  # best run: the least disturbed by other processes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bucket-mb", type=int, default=16)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--sync-worker", choices=["bucketed", "naive"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sync_worker:
        return sync_worker(args.sync_worker, args.bucket_mb << 20, args.layers)

    torch.set_num_threads(1)
    bucketed = run_sync("bucketed", args.bucket_mb << 20, args.layers)
    naive = run_sync("naive", args.bucket_mb << 20, args.layers)
    gen = bench_generation(args.layers)
    mb = 1 << 20
    print(f"\nmodel: Qwen2 {bucketed['params'] / 1e6:.1f}M params fp32 ({bucketed['bytes'] / mb:.0f} MiB), "
          f"largest parameter {bucketed['largest_param_bytes'] / mb:.0f} MiB; FSDP2 on 2 CPU ranks, bucket {args.bucket_mb} MiB")
    print(f"{'measure':<44}{'bucketed / engine':>18}{'naive / generate':>18}{'ratio':>10}")
    print(f"{'weight sync time (s)':<44}{bucketed['time_s']:>18.3f}{naive['time_s']:>18.3f}"
          f"{bucketed['time_s'] / naive['time_s']:>10.2f}")
    print(f"{'weight sync peak extra memory (MiB, max rank)':<44}{bucketed['peak_extra'] / mb:>18.1f}"
          f"{naive['peak_extra'] / mb:>18.1f}{bucketed['peak_extra'] / naive['peak_extra']:>10.3f}  (target < 0.25)")
    print(f"{'generation tokens/s (batch 8, 32 new tokens)':<44}{gen['engine']:>18.1f}{gen['hf']:>18.1f}"
          f"{gen['engine'] / gen['hf']:>10.2f}  (target >= 1.0)")


if __name__ == "__main__":
    main()

"""Rollout-engine benchmarks on CPU, printed as one table of ratios measured in this run.

1. Weight sync from an FSDP2-sharded actor (2 gloo ranks, an HFEngine on each rank): the bucketed
   stream (``push_weights``) vs gathering a full state dict first (``get_model_state_dict(...,
   full_state_dict=True)`` then ``update_weights``). Peak extra memory is the rise of the process's
   resident-set high-water mark over the resident set before the sync (the mark is reset through
   /proc/self/clear_refs; glibc's mmap threshold is pinned so freed tensors leave the resident set).
2. Generation throughput of ``HFEngine.generate`` vs ``model.generate`` on the same left-padded batch,
   same sampling settings and the same number of new tokens, best of 5 interleaved runs each.
3. ``--vllm``: on the real SmolLM2-135M-Instruct, ``VLLMEngine`` (real vLLM, its CPU build) vs ``HFEngine``:
   generation tokens/s with the same chat-rendered prompts, n, length (no EOS stop) and dtype, best of
   3 interleaved runs; and the GRPO step time (``LightRFTFake``, the same GRPO settings) with each engine,
   the median of the steps after the first (which builds the engine). Run it in the vLLM venv:
   ``.venv-vllm/bin/python bench/bench_engines.py --vllm [--dtype float32|bfloat16]``.
4. ``--vllm-sync``: on the real SmolLM2-135M-Instruct, the seconds of one weight push into a real
   ``VLLMEngine`` (what the callback logs as ``rollout/sync_s``): the whole update in one
   ``reload_weights`` (``push_weights``) vs one ``reload_weights`` per bucket (``update_weights`` bucket by
   bucket, the earlier way), buckets of ``--bucket-mb``, best of 5 interleaved pushes; the pushed weights
   are checked against the actor's greedy decode.
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


# ---------------------------------------------------------------------------- real model: vLLM vs HF engine
REAL = "smollm2-135m-instruct"


def _real_prompts(tokenizer, count: int) -> list[list[int]]:
    from lightrft_lightning.data import render_prompts
    from lightrft_lightning.tasks import arithmetic_problems

    _, ids = render_prompts(arithmetic_problems(count, seed=1), tokenizer, apply_chat_template=True)
    return ids


def bench_real_generation(dtype: str, prompts: int, n: int, new_tokens: int, repeats: int = 3,
                          compile_vllm: bool = False) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightrft_lightning import pretrained
    from lightrft_lightning.engines import VLLMEngine

    path = pretrained.resolve(REAL)
    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).eval()
    ids = _real_prompts(AutoTokenizer.from_pretrained(path), prompts)
    hf = HFEngine(model, pad_token_id=model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0)
    start = time.perf_counter()
    vllm = VLLMEngine(path, dtype=dtype, enforce_eager=not compile_vllm, max_model_len=512)
    built = time.perf_counter() - start
    params = SamplingParams(n=n, temperature=1.0, max_new_tokens=new_tokens, stop_at_eos=False, seed=0)
    rates: dict[str, list[float]] = {"vllm": [], "hf": []}
    for name, engine in (("vllm", vllm), ("hf", hf)):
        engine.generate(ids[:2], params)  # warm up
    for _ in range(repeats):  # interleaved, so background load hits both alike
        for name, engine in (("vllm", vllm), ("hf", hf)):
            start = time.perf_counter()
            tokens = sum(len(c.token_ids) for c in engine.generate(ids, params))
            rates[name].append(tokens / (time.perf_counter() - start))
            print(f"  {name}: {rates[name][-1]:.1f} tokens/s", file=sys.stderr, flush=True)
    return {"vllm": max(rates["vllm"]), "hf": max(rates["hf"]), "vllm_start_s": built,
            "sequences": prompts * n, "new_tokens": new_tokens}


def grpo_worker(engine_type: str, dtype: str, steps: int, compile_vllm: bool, prompts: int, n: int,
                new_tokens: int) -> None:
    """One GRPO run on the real model with ``engine_type`` ("hf" or "vllm"); prints the step times."""
    import lightning.pytorch as pl

    from lightrft_lightning import LightRFTFake
    from lightrft_lightning.algorithms import GRPO
    from lightrft_lightning.callbacks import RolloutEngineCallback
    from lightrft_lightning.data import PromptDataModule
    from lightrft_lightning.tasks import arithmetic_problems

    pl.seed_everything(0, verbose=False)
    model = GRPO(model=REAL, apply_chat_template=True, rewards={"lightrft_lightning.tasks:arithmetic_reward": 1.0},
                 n_samples_per_prompt=n, max_new_tokens=new_tokens, temperature=1.0, micro_train_batch_size=prompts * n,
                 actor_learning_rate=1e-5, advantage_estimator="group_norm")
    data = PromptDataModule(prompts=arithmetic_problems(64, seed=2), batch_size=prompts, shuffle=False)
    times: list[float] = []
    generate: list[float] = []

    class Timer(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            times.append(time.perf_counter() - self.start)
            generate.append(float(trainer.callback_metrics.get("time/generate", float("nan"))))

    kwargs = {"engine_kwargs": {"enforce_eager": not compile_vllm, "max_model_len": 512}} if engine_type == "vllm" else {}
    precision = "bf16-mixed" if dtype == "bfloat16" else "32-true"
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=LightRFTFake({"engine_type": engine_type}),
                         precision=precision, max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[RolloutEngineCallback(bucket_bytes=64 << 20, **kwargs), Timer()])
    trainer.fit(model, data)
    print("GRPO " + json.dumps({"engine": engine_type, "step_s": times, "generate_s": generate}), flush=True)


def run_grpo(engine_type: str, dtype: str, steps: int, compile_vllm: bool, prompts: int, n: int, new_tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--grpo-worker", engine_type, "--dtype", dtype, "--steps", str(steps),
           "--prompts", str(prompts), "--n", str(n), "--new-tokens", str(new_tokens)]
    if compile_vllm:
        cmd.append("--vllm-compile")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("GRPO ")), None)
    if line is None:
        raise RuntimeError(f"GRPO worker {engine_type} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    out = json.loads(line[5:])
    later = sorted(out["step_s"][1:]) or out["step_s"]
    gens = sorted(out["generate_s"][1:]) or out["generate_s"]
    return {"step_s": later[len(later) // 2], "generate_s": gens[len(gens) // 2], "first_step_s": out["step_s"][0]}


def main_vllm(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gen = bench_real_generation(args.dtype, args.prompts, args.n, args.new_tokens, compile_vllm=args.vllm_compile)
    grpo = {name: run_grpo(name, args.dtype, args.steps, args.vllm_compile, args.prompts, args.n, args.new_tokens)
            for name in ("vllm", "hf")} if args.steps else None
    mode = "torch.compile" if args.vllm_compile else "eager"
    print(f"\nmodel: SmolLM2-135M-Instruct {args.dtype}, {gen['sequences']} sequences ({args.prompts} prompts x n={args.n}) "
          f"x {gen['new_tokens']} new tokens, sampled, no EOS stop; vLLM {mode}, engine start {gen['vllm_start_s']:.1f} s; "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'measure':<46}{'VLLMEngine':>14}{'HFEngine':>14}{'vLLM / HF':>12}")
    print(f"{'generation tokens/s':<46}{gen['vllm']:>14.1f}{gen['hf']:>14.1f}{gen['vllm'] / gen['hf']:>12.2f}")
    if grpo is None:
        return
    print(f"{'GRPO step time (s, median after step 1)':<46}{grpo['vllm']['step_s']:>14.2f}{grpo['hf']['step_s']:>14.2f}"
          f"{grpo['vllm']['step_s'] / grpo['hf']['step_s']:>12.2f}")
    print(f"{'  of which rollout generation (s)':<46}{grpo['vllm']['generate_s']:>14.2f}{grpo['hf']['generate_s']:>14.2f}"
          f"{grpo['vllm']['generate_s'] / grpo['hf']['generate_s']:>12.2f}")
    print(f"{'  first step, engine built (s)':<46}{grpo['vllm']['first_step_s']:>14.2f}{grpo['hf']['first_step_s']:>14.2f}")
    print(f"GRPO: LightRFTFake, the same prompts x n x new tokens per step, one micro batch, {args.steps} steps")


def main_vllm_sync(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM

    from lightrft_lightning import pretrained
    from lightrft_lightning.engines import RolloutEngine, VLLMEngine
    from lightrft_lightning.engines.weight_sync import iter_weight_buckets

    path = pretrained.resolve(REAL)
    actor = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
    with torch.no_grad():  # weights the engine does not hold yet, so a push must change what it generates
        for i, p in enumerate(actor.parameters()):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=p.dtype) * 0.01)
    engine = VLLMEngine(path, dtype=args.dtype, enforce_eager=True, max_model_len=512)
    bucket_bytes = args.bucket_mb << 20

    def per_bucket() -> None:  # one reload per bucket
        RolloutEngine.load_weight_buckets(engine, ((b, False) for b in iter_weight_buckets(actor, bucket_bytes)))
        engine.finish_weight_update()

    times: dict[str, list[float]] = {"one reload": [], "per bucket": []}
    reloads: dict[str, int] = {}
    for repeat in range(5):
        pushes = [("one reload", lambda: push_weights(actor, engine, bucket_bytes)), ("per bucket", per_bucket)]
        for name, push in pushes[::1 if repeat % 2 else -1]:  # alternate which goes first
            before = engine.reloads
            start = time.perf_counter()
            push()
            times[name].append(time.perf_counter() - start)
            reloads[name] = engine.reloads - before
    prompt = [[1, 2, 3, 4, 5]]
    out = engine.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=8, stop_at_eos=False))[0].token_ids
    ref = actor.generate(torch.tensor(prompt), max_new_tokens=8, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, 5:].tolist()
    size = sum(p.numel() * p.element_size() for p in actor.parameters()) / (1 << 20)
    print(f"\nweight push into VLLMEngine, SmolLM2-135M-Instruct {args.dtype} ({size:.0f} MiB), buckets of "
          f"{args.bucket_mb} MiB, best of 5; greedy after the push equals the actor's: {out == ref}")
    for name, values in times.items():
        print(f"{name:<14}{reloads[name]:>4} reloads  sync_s {min(values):8.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bucket-mb", type=int, default=16)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--sync-worker", choices=["bucketed", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--vllm", action="store_true", help="VLLMEngine vs HFEngine on the real model (vLLM venv)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="GRPO steps per engine (0: generation only)")
    parser.add_argument("--vllm-compile", action="store_true", help="let vLLM torch.compile (slow start on CPU)")
    parser.add_argument("--grpo-worker", choices=["hf", "vllm"], help=argparse.SUPPRESS)
    parser.add_argument("--vllm-sync", action="store_true", help="one reload per push vs per bucket (vLLM venv)")
    args = parser.parse_args()
    if args.sync_worker:
        return sync_worker(args.sync_worker, args.bucket_mb << 20, args.layers)
    if args.grpo_worker:
        return grpo_worker(args.grpo_worker, args.dtype, args.steps, args.vllm_compile, args.prompts, args.n,
                           args.new_tokens)
    if args.vllm:
        return main_vllm(args)
    if args.vllm_sync:
        return main_vllm_sync(args)

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

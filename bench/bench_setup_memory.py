"""Per-rank peak memory (RSS) at setup: GRPO on the real SmolLM2-135M-Instruct with a KL reference, 2 CPU
ranks (gloo), ``Trainer.fit`` stopped once the strategy has set the models up (FSDP2 shards, ZeRO-3
partitions). Prints per rank: RSS after imports, after building the module (actor and reference), the
peak while the models are loaded and sharded or partitioned (up to ``configure_optimizers``), the peak up
to the end of the strategy's setup (DeepSpeed also allocates its optimizer states there; FSDP2 at the first
step), what setup left, and that plus the rollout engine; in MB and in units of the model's fp32 bytes (4P).

``--bf16``: the same model saved in bf16 first (most published checkpoints are): loading it in fp32 makes a
private fp32 copy where the whole model is loaded.

Usage: DS_ACCELERATOR=cpu python bench/bench_setup_memory.py [--bf16] [lightrft_fsdp lightrft_deepspeed_stage_3]
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys

from bench_fsdp import launch  # same folder: run as python bench/bench_setup_memory.py

STRATEGIES = ("lightrft_fsdp", "lightrft_deepspeed_stage_3")
NAME = "smollm2-135m-instruct"


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def anon() -> int:
    """Private (anonymous) resident bytes: RSS less the file pages a memory-mapped checkpoint brings in,
    which the ranks share in the page cache."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(strategy: str, model: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import lightning.pytorch as pl
    import torch
    import torch.distributed as dist

    from lightrft_lightning.algorithms import GRPO
    from lightrft_lightning.data import PromptDataModule

    torch.set_num_threads(1)
    marks = {"imports": rss(), "anon_imports": anon()}

    class Stop(pl.Callback):
        def on_fit_start(self, trainer, pl_module) -> None:  # the strategy's setup is done; the engine is next
            marks["peak_setup"], marks["after_setup"], marks["anon_setup"] = peak(), rss(), anon()

        def on_train_start(self, trainer, pl_module) -> None:
            marks["with_engine"] = rss()
            trainer.should_stop = True

    pl.seed_everything(0)
    module = GRPO(model=model, tokenizer="smollm2-135m-instruct", kl_coef=0.05, max_new_tokens=4, n_samples_per_prompt=2,
                  micro_train_batch_size=4)
    marks["built"], marks["anon_built"] = rss(), anon()
    configure_optimizers = module.configure_optimizers

    def models_loaded():  # the strategy calls it once the models are sharded or partitioned
        marks["peak_models"] = peak()
        return configure_optimizers()

    module.configure_optimizers = models_loaded
    marks["model_fp32"] = sum(p.numel() for p in module.actor.parameters()) * 4
    data = PromptDataModule(prompts=["1+1="] * 4, batch_size=2, shuffle=False)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[Stop()])
    trainer.fit(module, datamodule=data)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, marks)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(everyone), flush=True)
    dist.barrier()


def bf16_copy(name: str) -> str:
    """The built-in model ``name`` saved in bf16 (with its tokenizer) in a temporary directory."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    from lightrft_lightning import pretrained

    out = tempfile.mkdtemp(prefix="bench-setup-bf16-")
    AutoModelForCausalLM.from_pretrained(pretrained.resolve(name), dtype=torch.bfloat16).save_pretrained(out)
    return out


def main(strategies: tuple[str, ...], bf16: bool) -> None:
    model = bf16_copy(NAME) if bf16 else NAME
    try:
        table(strategies, model, bf16)
    finally:
        if bf16:
            shutil.rmtree(model, ignore_errors=True)


def table(strategies: tuple[str, ...], model: str, bf16: bool) -> None:
    print(f"checkpoint: {NAME} in {'bf16' if bf16 else 'fp32'}")
    print(f"{'strategy':>28} {'rank':>4} {'imports MB':>10} {'built MB':>9} {'peak models MB':>14} {'peak setup MB':>13} "
          f"{'after setup MB':>14} {'+ engine MB':>11} {'(peak models-imports)/4P':>24} {'(peak-imports)/4P':>17} "
          f"{'anon built/setup MB':>19}")
    for strategy in strategies:
        for rank, m in enumerate(launch(2, strategy, model, script=__file__)):
            print(f"{strategy:>28} {rank:>4} {m['imports'] / 2**20:>10.0f} {m['built'] / 2**20:>9.0f} "
                  f"{m['peak_models'] / 2**20:>14.0f} {m['peak_setup'] / 2**20:>13.0f} {m['after_setup'] / 2**20:>14.0f} "
                  f"{m['with_engine'] / 2**20:>11.0f} {(m['peak_models'] - m['imports']) / m['model_fp32']:>24.2f} "
                  f"{(m['peak_setup'] - m['imports']) / m['model_fp32']:>17.2f} "
                  f"{(m['anon_built'] - m['anon_imports']) / 2**20:>9.0f}/{(m['anon_setup'] - m['anon_imports']) / 2**20:<9.0f}")


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        names = [a for a in sys.argv[1:] if a != "--bf16"]
        main(tuple(names) or STRATEGIES, "--bf16" in sys.argv[1:])

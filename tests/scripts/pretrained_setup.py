"""GRPO with a KL reference (or PPO, with its critic) on a pretrained tiny Qwen2 directory under a Trainer, 2 steps
of greedy rollouts; reports each step's metrics and what each rank held at set-up.

    torchrun --nproc_per_node=N pretrained_setup.py MODEL_DIR STRATEGY ALGO MODE [PRECISION [TOKENIZER]]

``MODE`` "meta": the module as built (a pretrained actor is on the meta device until the strategy's set-up);
"loaded": its weights loaded whole on every rank before the Trainer starts, the path every rank took before the
actor was built on the meta device (the reference sharing the actor's tensors). ``PRECISION``: the Trainer's
(default "32-true"). ``TOKENIZER``: the model's own (a name or directory) instead of the character tokenizer of
the tiny test checkpoints (bench/check_pretrained_real.py: the real SmolLM2).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

import lightning.pytorch as pl
import torch
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

from lightrft_lightning.algorithms import GRPO, PPO
from lightrft_lightning.data import PromptDataModule
from lightrft_lightning.parallel.meta_init import materialize_meta
from tests.launch import report

CHARS = "0123456789+="


def digit_reward(prompts, completions, metadata):
    """Dense: greedy completions of different prompts score differently."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


class Held(pl.Callback):
    """The actor's and the reference's parameters at each point of the set-up: all on the meta device when the
    strategy's set-up begins (``setup`` hooks run before it), then the fraction of the model's elements this rank
    holds, and whether the gathered weights are the checkpoint's."""

    def __init__(self, checkpoint: dict[str, torch.Tensor]) -> None:
        self.checkpoint = checkpoint
        self.summary: dict = {"steps": []}

    def setup(self, trainer, pl_module, stage) -> None:
        self.summary["meta_before_setup"] = {name: all(p.is_meta for p in model.parameters())
                                             for name, model in self._models(pl_module).items()}

    def on_fit_start(self, trainer, pl_module) -> None:
        held, same = {}, {}
        for name, model in self._models(pl_module).items():
            params = list(model.parameters())
            held[name] = sum(map(local_numel, params)) / sum(getattr(p, "ds_numel", p.numel()) for p in params)
            prefix = "model." if name == "critic" else ""
            with gathered(params):
                full = {n: p.full_tensor() if isinstance(p, DTensor) else p for n, p in model.named_parameters()}
                same[name] = all(torch.equal(full[k[len(prefix):]].cpu(), v) for k, v in self.checkpoint.items()
                                 if k[len(prefix):] in full)
        self.summary.update(held=held, weights_are_the_checkpoints=same)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.summary["steps"].append({k: float(v) for k, v in trainer.callback_metrics.items()})

    @staticmethod
    def _models(pl_module) -> dict:
        models = {"actor": pl_module.actor, "ref": getattr(pl_module, "ref", None),
                  "critic": getattr(getattr(pl_module, "critic", None), "model", None)}
        return {k: v for k, v in models.items() if v is not None}


def gathered(params: list) -> contextlib.AbstractContextManager:
    """ZeRO-3 partitions gathered whole while the context lives (a collective); anything else as it is."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params)
    return contextlib.nullcontext()


def local_numel(param: torch.Tensor) -> int:
    """The elements of ``param`` this rank holds: its FSDP2 shard, its ZeRO-3 partition, or all of it."""
    if isinstance(param, DTensor):
        return param.to_local().numel()
    return param.ds_tensor.numel() if hasattr(param, "ds_tensor") else param.numel()


def whole_model_loads() -> list:
    """From now on, the ``from_pretrained`` calls that load a whole model on this rank (listed as they happen)."""
    import transformers

    calls: list = []
    original = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def counted(cls, *args, **kwargs):
        calls.append(args[:1])
        return original(cls, *args, **kwargs)

    transformers.AutoModelForCausalLM.from_pretrained = classmethod(counted)
    return calls


def fit(path: str, strategy: str, algo: str, mode: str, precision: str = "32-true", accelerator: str = "cpu",
        world: int = 1, tokenizer: str = "char") -> dict:
    """Two steps of GRPO (with a KL reference) or PPO on the pretrained directory ``path`` under
    ``Trainer(strategy, precision)`` on ``world`` devices; what each rank held at set-up, each step's metrics and how
    many whole-model ``from_pretrained`` calls ``fit`` made."""
    pl.seed_everything(0, verbose=False)
    chars = {"tokenizer_chars": CHARS} if tokenizer == "char" else {}
    common = dict(model=path, tokenizer=tokenizer, **chars, rewards={"tests.scripts.pretrained_setup:digit_reward": 1.0},
                  max_new_tokens=4, temperature=1.0, micro_train_batch_size=8 // world, actor_learning_rate=1e-2)
    module = (GRPO(kl_coef=0.1, n_samples_per_prompt=2, **common) if algo == "grpo"
              else PPO(n_samples_per_prompt=2, critic_learning_rate=1e-2, **common))
    if mode == "loaded":
        materialize_meta(module, torch.device("cpu"), seed=0)
    held = Held(load_file(f"{path}/model.safetensors"))
    data = PromptDataModule(prompts=["1+2=", "3+4=", "5+6=", "7+8="] * 2, batch_size=4 // world, shuffle=False)
    trainer = pl.Trainer(accelerator=accelerator, devices=world, strategy=strategy, precision=precision, max_steps=2,
                         logger=False, callbacks=[held], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    loads = whole_model_loads()
    trainer.fit(module, data)
    return {**held.summary, "whole_model_loads": len(loads)}


def main() -> None:
    path, strategy, algo, mode = sys.argv[1:5]
    precision = sys.argv[5] if len(sys.argv) > 5 else "32-true"
    tokenizer = sys.argv[6] if len(sys.argv) > 6 else "char"
    report(fit(path, strategy, algo, mode, precision, world=int(os.environ.get("WORLD_SIZE", 1)), tokenizer=tokenizer))


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    main()

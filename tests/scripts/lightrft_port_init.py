"""``trainer.init_module(empty_init=True)`` under a Trainer: a module whose ``configure_model`` builds its
policy (a Hugging Face model and a plain ``nn.Linear`` head) inside it, or a module built under it
before ``fit``, trains to the numbers of one built normally. Importable (the fake strategy runs
in-process) and runnable with torchrun on 2 CPU ranks, where it fits LightRFTFSDP and LightRFTDeepSpeed
ZeRO-3 each with a normal and an empty-init build in one launch.

Usage: torchrun --nproc_per_node=2 lightrft_port_init.py
Prints ``RESULT {json}`` on rank 0: per run, the full weights' sums at fit start and end, and the losses.
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader

STEPS, MICRO, SEQ = 3, 2, 8


class Policy(nn.Module):
    """A Hugging Face model (rebuilt from its config on materialization) and a plain head (whose
    ``reset_parameters`` is replayed), built on the global RNG."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import Qwen2ForCausalLM

        from lightrft_lightning.tiny_models import tiny_qwen2_config

        self.head = nn.Linear(32, 4)
        self.lm = Qwen2ForCausalLM(tiny_qwen2_config())
        self.scale = nn.Linear(4, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.lm(input_ids=ids, labels=ids, output_hidden_states=True)
        return out.loss + self.scale(self.head(out.hidden_states[-1])).pow(2).mean()


def build_policy() -> Policy:
    torch.manual_seed(3)
    return Policy()


def full_weights(module: nn.Module) -> dict[str, float]:
    """Each parameter's full (gathered) sum; a collective under FSDP and ZeRO-3."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, param in module.named_parameters():
        if isinstance(param, DTensor):
            tensor = param.full_tensor()
        elif hasattr(param, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([param]):
                tensor = param.data.clone()
        else:
            tensor = param.detach()
        out[name] = tensor.double().sum().item()
    return out


class Module(LightningModule):
    """``mode``: "normal" (built in ``configure_model``), "configure" (built there under
    ``trainer.init_module(empty_init=True)``), or "eager" (``build=True``: built in ``__init__``, which a
    caller runs under ``trainer.init_module(empty_init=True)`` or not)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.policy = build_policy() if mode == "eager" else None
        self.built_on_meta = self.policy is not None and all(p.is_meta for p in self.policy.parameters())
        self.losses: list[float] = []
        self.start: dict[str, float] = {}
        self.end: dict[str, float] = {}

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        if self.mode == "configure":
            with self.trainer.init_module(empty_init=True):
                self.policy = build_policy()
            self.built_on_meta = all(p.is_meta for p in self.policy.parameters())
        else:
            self.policy = build_policy()

    def on_fit_start(self) -> None:
        self.start = full_weights(self.policy)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.policy(batch)
        self.losses.append(float(self.trainer.strategy.reduce(loss.detach(), reduce_op="mean")))
        return loss

    def on_train_end(self) -> None:
        self.end = full_weights(self.policy)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.policy.parameters(), lr=1e-2)

    def train_dataloader(self):
        data = torch.randint(0, 64, (16, SEQ), generator=torch.Generator().manual_seed(0))
        return DataLoader(list(data), batch_size=MICRO)


def fit(strategy, mode: str, devices: int = 1) -> dict:
    """Fit ``Module(mode)`` for ``STEPS`` steps; ``mode="eager_empty"`` builds it under
    ``trainer.init_module(empty_init=True)`` before ``fit``."""
    trainer = Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=STEPS, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0)
    if mode == "eager_empty":
        with trainer.init_module(empty_init=True):
            module = Module("eager")
    else:
        module = Module(mode)
    trainer.fit(module)
    return {"start": module.start, "end": module.end, "losses": module.losses, "meta": module.built_on_meta}


def main() -> None:
    import warnings

    from lightrft_lightning import StrategyConfig
    from lightrft_lightning.strategies.deepspeed import LightRFTDeepSpeed
    from lightrft_lightning.strategies.fsdp import LightRFTFSDP
    from tests.launch import report

    warnings.filterwarnings("ignore")
    config = dict(bf16=False, train_batch_size=2 * MICRO, micro_train_batch_size=MICRO, max_norm=0.0,
                  dist_timeout_minutes=1.0)
    results = {}
    for name, make in [("fsdp", lambda: LightRFTFSDP(StrategyConfig(fsdp=True, **config))),
                       ("ds3", lambda: LightRFTDeepSpeed(StrategyConfig(zero_stage=3, **config)))]:
        for mode in ("normal", "configure"):
            results[f"{name}_{mode}"] = fit(make(), mode, devices=2)
    report(results)


if __name__ == "__main__":
    main()

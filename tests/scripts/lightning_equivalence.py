"""The same manual-optimization LightningModule (actor + critic + frozen ref, two optimizers, the
Lightning call shape) fitted under every strategy built by name, with and without clipping; writes the
final parameters and the parameter / state-dict names of each run, and a Lightning checkpoint of each
unclipped run (``OUT_DIR/<name>-noclip.ckpt``).

    PYTHONPATH=. torchrun --nproc_per_node=2 tests/scripts/lightning_equivalence.py OUT_DIR NAME [NAME ...]
    PYTHONPATH=. python tests/scripts/lightning_equivalence.py OUT_DIR lightrft_fake     (one process)
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import lightning as L
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

import lightrft_lightning  # noqa: F401  (registers the strategy names)
from tests.launch import report

STEPS, GLOBAL_BATCH, CLIP = 6, 8, 0.05
g = torch.Generator().manual_seed(0)
X = torch.randn(STEPS * GLOBAL_BATCH, 8, generator=g)
TARGET = torch.randn(STEPS * GLOBAL_BATCH, 4, generator=g)
VALUE = torch.randn(STEPS * GLOBAL_BATCH, generator=g)


def mlp(out: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, out))


def losses(actor: nn.Module, critic: nn.Module, ref: nn.Module, x, target, value) -> tuple[torch.Tensor, torch.Tensor]:
    pred = actor(x)
    with torch.no_grad():
        ref_pred = ref(x)
    actor_loss = (pred - target).pow(2).mean() + 0.1 * (pred - ref_pred).pow(2).mean()
    critic_loss = (critic(x).squeeze(-1) - value).pow(2).mean()
    return actor_loss, critic_loss


class ActorCritic(L.LightningModule):
    def __init__(self, clip: Optional[float]) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.clip = clip
        self.actor, self.critic, self.ref = mlp(4, 0), mlp(1, 1), mlp(4, 2).requires_grad_(False)

    def training_step(self, batch, batch_idx: int) -> None:
        actor_opt, critic_opt = self.optimizers()
        actor_loss, critic_loss = losses(self.actor, self.critic, self.ref, *batch)
        for loss, opt in ((actor_loss, actor_opt), (critic_loss, critic_opt)):
            self.manual_backward(loss)
            if self.clip is not None:
                self.clip_gradients(opt, gradient_clip_val=self.clip, gradient_clip_algorithm="norm")
            opt.step()
            opt.zero_grad()

    def configure_optimizers(self):
        return [torch.optim.AdamW(self.actor.parameters(), lr=1e-2), torch.optim.AdamW(self.critic.parameters(), lr=1e-2)]

    def train_dataloader(self):
        data = list(zip(X, TARGET, VALUE))
        world = self.trainer.world_size
        sampler = DistributedSampler(data, num_replicas=world, rank=self.global_rank, shuffle=False)
        return DataLoader(data, batch_size=GLOBAL_BATCH // world, sampler=sampler)


def plain_loop(clip: Optional[float]) -> dict[str, torch.Tensor]:
    """The reference: the same training written in plain torch, one process, the global batch."""
    actor, critic, ref = mlp(4, 0), mlp(1, 1), mlp(4, 2).requires_grad_(False)
    opts = [torch.optim.AdamW(actor.parameters(), lr=1e-2), torch.optim.AdamW(critic.parameters(), lr=1e-2)]
    norms = []
    for step in range(STEPS):
        rows = slice(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH)
        for loss, model, opt in zip(losses(actor, critic, ref, X[rows], TARGET[rows], VALUE[rows]), (actor, critic), opts):
            loss.backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip else float("inf"))))
            opt.step()
            opt.zero_grad()
    assert clip is None or min(norms) > clip, "the clipped reference must really clip"
    return {f"{name}.{k}": v.detach().clone() for name, m in (("actor", actor), ("critic", critic), ("ref", ref))
            for k, v in m.state_dict().items()}


def full_state(strategy, module: L.LightningModule) -> dict[str, torch.Tensor]:
    """Every child's unsharded state dict (a collective under FSDP2 / ZeRO-3)."""
    out = {}
    for name, child in module.named_children():
        state = strategy.full_state_dict(child) if hasattr(strategy, "full_state_dict") else child.state_dict()
        out.update({f"{name}.{k}": v.detach().cpu().clone() for k, v in state.items()})
    return out


def fit(name: str, clip: Optional[float], checkpoint: Optional[str]) -> tuple[dict[str, torch.Tensor], dict]:
    module = ActorCritic(clip)
    devices = 1 if name == "lightrft_fake" else int(os.environ.get("WORLD_SIZE", 1))
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=name, max_steps=STEPS, precision="32-true",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(module)
    if checkpoint:
        trainer.save_checkpoint(checkpoint)
    names = {"parameters": [n for n, _ in module.named_parameters()], "state_dict": list(module.state_dict()),
             "types": [type(m).__name__ for m in (module.actor, module.actor[0])]}
    return full_state(trainer.strategy, module), names


def main() -> None:
    out, names = sys.argv[1], sys.argv[2:]
    summary = {}
    for name in names:
        for clip in (None, CLIP):
            tag = f"{name}-{'clip' if clip else 'noclip'}"
            state, info = fit(name, clip, None if clip else os.path.join(out, f"{tag}.ckpt"))
            if int(os.environ.get("RANK", 0)) == 0:
                save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out, f"{tag}.safetensors"))
            summary[tag] = info
    report(summary)

if __name__ == "__main__":
    main()

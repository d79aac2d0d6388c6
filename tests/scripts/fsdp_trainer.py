"""``Trainer(strategy=LightRFTFSDP)`` on 2 CPU ranks: a manual-optimization module with an actor, a
critic (each with its optimizer and scheduler) and a frozen reference model. Run A fits 4 steps and
checkpoints every 2 through ``ModelCheckpoint`` (DCP directories); run B resumes from step 2 with
``fit(ckpt_path=...)``; run C shards in the user's ``configure_model``. Rank 0 prints ``TRAINER {json}``.

Usage: fsdp_trainer.py DIR
"""

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from lightrft_lightning.strategies.fsdp import LightRFTFSDP
from lightrft_lightning.tiny_models import tiny_causal_lm

CONFIG = dict(fsdp=True, bf16=False, train_batch_size=8, micro_train_batch_size=2, max_norm=1.0,
              dist_timeout_minutes=1.0)


class ActorCritic(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.actor = tiny_causal_lm(seed=1)
        self.critic = tiny_causal_lm(seed=2, vocab_size=8)  # its logits stand in for a value head
        self.ref = tiny_causal_lm(seed=1).requires_grad_(False)

    def training_step(self, batch, batch_idx):
        strategy = self.trainer.strategy
        (actor_opt, critic_opt), (actor_sched, critic_sched) = self.optimizers(), self.lr_schedulers()
        out = self.actor(input_ids=batch, labels=batch)
        with torch.no_grad():
            ref_logits = self.ref(input_ids=batch).logits
        actor_loss = out.loss + 0.1 * (out.logits - ref_logits).pow(2).mean()
        strategy.backward(actor_loss, self.actor, actor_opt)
        strategy.optimizer_step(actor_opt, self.actor, actor_sched, name="actor")
        values = self.critic(input_ids=batch % 8).logits.mean(-1)
        critic_loss = (values - 1.0).pow(2).mean()
        strategy.backward(critic_loss, self.critic, critic_opt)
        strategy.optimizer_step(critic_opt, self.critic, critic_sched, name="critic")
        self.log_dict({"actor_loss": actor_loss, "critic_loss": critic_loss})

    def configure_optimizers(self):
        actor_opt = torch.optim.AdamW(self.actor.parameters(), lr=1e-3)
        critic_opt = torch.optim.AdamW(self.critic.parameters(), lr=5e-3)
        return [actor_opt, critic_opt], [torch.optim.lr_scheduler.StepLR(o, 1, 0.5) for o in (actor_opt, critic_opt)]

    def train_dataloader(self):
        data = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(0))
        return DataLoader(list(data), batch_size=CONFIG["micro_train_batch_size"])  # 2 batches per rank and epoch


class UserSharded(ActorCritic):
    """A user's own ``configure_model`` wins: only the model roots are sharded, no blocks."""

    def configure_model(self) -> None:
        for model in (self.actor, self.critic, self.ref):
            fully_shard(model, mesh=self.device_mesh)


def fit(root: Path, ckpt_path=None, module=None, max_steps=4):
    module = module or ActorCritic()
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy=LightRFTFSDP(dict(CONFIG)), max_steps=max_steps, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root), log_every_n_steps=2,
        callbacks=[ModelCheckpoint(dirpath=str(root / "ckpts"), every_n_train_steps=2, save_top_k=-1)],
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    strategy = trainer.strategy
    blocks_sharded = not isinstance(module, UserSharded)
    assert all(isinstance(m, FSDPModule) for m in (module.actor, module.critic, module.ref))
    assert isinstance(module.actor.model.layers[0], FSDPModule) == blocks_sharded
    assert all(isinstance(p, DTensor) for p in module.parameters()), "sharding failed"
    assert not any(p.requires_grad for p in module.ref.parameters())
    params = {f"{name}.{k}": v.clone() for name in ("actor", "critic")
              for k, v in strategy.iter_full_params(getattr(module, name))}
    states = {name: strategy.stepper(getattr(module, name)) for name in ("actor", "critic")}
    return trainer, params, {
        "global_step": trainer.global_step,
        "optimizer_steps": {k: s.steps for k, s in states.items()},
        "lr": [o.param_groups[0]["lr"] for o in trainer.optimizers],
        "metrics": sorted(trainer.callback_metrics),
    }


def main(root: Path) -> None:
    trainer_a, params_a, info_a = fit(root / "a")
    ckpts = sorted(p.name for p in (root / "a" / "ckpts").iterdir())
    trainer_b, params_b, info_b = fit(root / "b", ckpt_path=str(root / "a" / "ckpts" / "epoch=0-step=2.ckpt"))
    diff = max((params_a[k] - v).abs().max().item() for k, v in params_b.items())
    _, _, info_c = fit(root / "c", module=UserSharded(), max_steps=2)
    if trainer_a.is_global_zero:
        print("TRAINER " + json.dumps({"a": info_a, "b": info_b, "c": info_c, "ckpts": ckpts, "resume_max_diff": diff}),
              flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))

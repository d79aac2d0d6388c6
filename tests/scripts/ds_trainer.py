"""`Trainer(accelerator="cpu", devices=2, strategy=<lightrft_deepspeed name>)` fits a manual
optimization module with actor + critic (training engines) + frozen ref (inference engine),
checkpoints after epoch 1 and resumes; the resumed run must reproduce the continuous run.

    PYTHONPATH=. torchrun --nproc_per_node=2 tests/scripts/ds_trainer.py OUT_DIR lightrft_deepspeed [lightrft_deepspeed_stage_3 ...]
"""

import os
import sys

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

import lightrft_lightning  # noqa: F401  (registers the strategy names)
from lightrft_lightning.strategies.deepspeed import LightRFTDeepSpeed
from lightrft_lightning.tiny_models import tiny_causal_lm
from tests.launch import report

DATA = torch.randint(0, 64, (8, 10), generator=torch.Generator().manual_seed(4))


class ActorCritic(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.actor = tiny_causal_lm(seed=0)
        self.critic = tiny_causal_lm(seed=1)
        self.ref = tiny_causal_lm(seed=0).requires_grad_(False)
        self.history: list[tuple[int, float, float]] = []

    def training_step(self, ids: torch.Tensor, batch_idx: int) -> None:
        actor_opt, critic_opt = self.optimizers()
        step = self.global_step
        with torch.no_grad():
            ref_logp = self.ref(input_ids=ids).logits.log_softmax(-1)
        out = self.actor(input_ids=ids, labels=ids)
        actor_loss = out.loss + 0.1 * (out.logits.log_softmax(-1) - ref_logp).pow(2).mean()
        self.manual_backward(actor_loss)  # no optimizer: routed to the actor's engine
        actor_opt.step()
        value = self.critic(input_ids=ids).logits[..., 0].mean()
        critic_loss = (value - 1.0) ** 2
        self.manual_backward(critic_loss)
        critic_opt.step()
        for sched in self.lr_schedulers():
            sched.step()
        strategy = self.trainer.strategy
        self.history.append((step, strategy.all_reduce(actor_loss.item()), strategy.all_reduce(critic_loss.item())))

    def configure_optimizers(self):
        actor_opt = torch.optim.AdamW(self.actor.parameters(), lr=1e-2)
        critic_opt = torch.optim.AdamW(self.critic.parameters(), lr=1e-2)
        decay = lambda step: 0.8 ** step  # noqa: E731
        return [actor_opt, critic_opt], [torch.optim.lr_scheduler.LambdaLR(actor_opt, decay),
                                         torch.optim.lr_scheduler.LambdaLR(critic_opt, decay)]

    def train_dataloader(self):
        # one batch per rank and epoch, the same every epoch: the resume check is about the engines'
        # state, not about where Lightning restarts a dataloader
        sampler = DistributedSampler(DATA, num_replicas=self.trainer.world_size, rank=self.global_rank, shuffle=False)
        return DataLoader(DATA, batch_size=len(DATA) // self.trainer.world_size, sampler=sampler)


def fit(strategy: str, max_steps: int, ckpt_path=None):
    L.seed_everything(0)
    module = ActorCritic()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=max_steps, logger=False,
                        use_distributed_sampler=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer, module


def check(name: str, out: str) -> dict:
    continuous, module = fit(name, 8)
    strategy = continuous.strategy
    assert isinstance(strategy, LightRFTDeepSpeed), type(strategy)
    assert continuous.global_step == 8, continuous.global_step  # training steps, not optimizer steps
    # the children stay the user's modules; the strategy holds their engines
    assert type(module.actor).__name__ == "Qwen2ForCausalLM" and not module.ref.training
    assert {n for n, _ in module.named_children()} == {"actor", "critic", "ref"}
    assert all(not n.startswith(("actor.module.", "critic.module.")) for n in module.state_dict())
    stage = strategy.zero_stage
    actor, critic, ref = (strategy.engine_of(m) for m in (module.actor, module.critic, module.ref))
    assert actor.module is module.actor and actor.optimizer is not None
    assert actor.zero_optimization_stage() == stage
    assert ref.zero_optimization_stage() == (3 if stage == 3 else 0)
    assert actor.global_steps == 8 and critic.global_steps == 8

    first, _ = fit(name, 4)
    path = os.path.join(out, name, "epoch1.ckpt")
    first.save_checkpoint(path)
    for child in ("actor", "critic"):
        assert os.path.isfile(os.path.join(path, child, "latest")), child
    assert not os.path.exists(os.path.join(path, "ref"))  # frozen: nothing to save
    resumed, module2 = fit(name, 8, ckpt_path=path)
    assert resumed.global_step == 8
    tail = module.history[4:]
    diff = max(max(abs(a[1] - b[1]), abs(a[2] - b[2])) for a, b in zip(tail, module2.history))
    assert [h[0] for h in module2.history] == [4, 5, 6, 7], module2.history
    assert diff < 1e-6, (tail, module2.history)
    assert abs(module2.lr_schedulers()[0].get_last_lr()[0] - 1e-2 * 0.8**8) < 1e-12
    # losses moved: the engines really train
    assert module.history[-1][2] < module.history[0][2]
    return {"stage": stage, "resume_loss_diff": diff, "global_step": resumed.global_step}


def main() -> None:
    out = sys.argv[1]
    summary = {name: check(name, out) for name in sys.argv[2:]}
    report(summary)


if __name__ == "__main__":
    main()

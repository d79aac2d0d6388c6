"""A LightRFT-style training script (the strategy calls of LightRFT's ``train_colocate.py`` and trainers,
in their order and call shapes), importable for the in-process fake run and runnable with torchrun on
2 CPU ranks, where it trains on LightRFTFSDP, LightRFTDeepSpeed ZeRO-2 and ZeRO-3 in one launch.

Usage: torchrun --nproc_per_node=2 lightrft_port_train.py DIR   (DIR holds init.pt from the test)
Prints ``RESULT {json}`` on rank 0: per backend the step losses, grad norms, full final weights' checksums...
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

STEPS, GLOBAL_BATCH, MICRO, SEQ, ROWS = 3, 8, 2, 10, 32
MAX_NORM, LR, BETA = 0.05, 1e-2, 0.5
PROMPTS = [[3, 4, 5, 6], [7, 8, 9, 10]]


class Actor(nn.Module):
    """LightRFT's ``Actor``: a wrapper whose ``.model`` is the Hugging Face model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, labels=ids).loss


def dataset() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return list(torch.randint(0, 64, (ROWS, SEQ), generator=gen))


def lightrft_args(**overrides) -> argparse.Namespace:
    """What LightRFT's argparse gives its script (the names are LightRFT's)."""
    values = dict(seed=7, max_norm=MAX_NORM, micro_train_batch_size=MICRO, train_batch_size=GLOBAL_BATCH, bf16=False,
                  zero_stage=2, fsdp=False, actor_learning_rate=LR, critic_learning_rate=LR, l2=0.0,
                  adam_betas=(0.9, 0.95), lr_warmup_ratio=0.34, dist_timeout_minutes=2.0, pretrain="tiny",
                  save_path="unused", num_episodes=1, engine_type="hf", enable_engine_sleep=True)
    values.update(overrides)
    return argparse.Namespace(**values)


def full_weights(strategy, model) -> dict[str, torch.Tensor]:
    """The unsharded weights on every rank (a collective)."""
    module = strategy.unwrap_model(model)
    out = {}
    from torch.distributed.tensor import DTensor

    for name, param in module.named_parameters():
        if isinstance(param, DTensor):
            out[name] = param.full_tensor().detach().cpu().clone()
        elif hasattr(param, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([param]):
                out[name] = param.data.detach().cpu().clone()
        else:
            out[name] = param.detach().cpu().clone()
    return out


def train(strategy, init_path: str, ckpt_dir: str, meta_init: bool) -> dict:
    """The LightRFT call sequence: models under init_model_context, prepare_models_and_optimizers,
    setup_dataloader, backward/optimizer_step/moving_average per micro-batch, save_ckpt/load_ckpt of
    ``actor.model``, load_model, offload/reload."""
    from lightrft_lightning.tiny_models import tiny_causal_lm

    args = strategy.args
    with strategy.init_model_context(meta_init=meta_init):
        actor = Actor(tiny_causal_lm(seed=1))
        initial_model = tiny_causal_lm(seed=1)
    reward_models = [tiny_causal_lm(seed=2), tiny_causal_lm(seed=3)]
    ema = tiny_causal_lm(seed=1)
    steps_per_epoch = ROWS // GLOBAL_BATCH
    (actor, actor_optim, actor_scheduler), (critic, critic_optim, critic_scheduler), reward_models, initial_model = \
        strategy.prepare_models_and_optimizers(actor, None, reward_models, initial_model, args, steps_per_epoch)
    assert critic is None and critic_optim is None and critic_scheduler is None and len(reward_models) == 2
    ema = strategy.prepare(ema, is_rlhf=True)
    # meta-initialized weights are real now; load the common initial weights (a plain state-dict file)
    strategy.load_model(actor, init_path, strict=True)
    strategy.load_model(ema, init_path, strict=True)
    dataloader = strategy.setup_dataloader(dataset(), MICRO, pin_memory=False, shuffle=True, consumed_samples=0)
    losses, norms, lrs = [], [], []
    step_loss, micro = 0.0, 0
    for batch in dataloader:
        loss = actor(batch)
        strategy.backward(loss, actor, actor_optim)
        stepped = strategy.optimizer_step(actor_optim, actor, actor_scheduler, name="actor")
        strategy.moving_average(actor, ema, BETA, "cpu")
        step_loss += loss.item() / strategy.accumulated_gradient
        micro += 1
        if stepped:
            losses.append(strategy.all_reduce(step_loss))
            norms.append(strategy.stepper(actor).grad_norm)
            lrs.append(actor_scheduler.get_last_lr()[0])
            step_loss = 0.0
        if len(losses) == STEPS:
            break
    weights = full_weights(strategy, actor)
    ema_weights = full_weights(strategy, ema)
    # the rollout engine: built from the actor, weights pushed (gathered), prompts gathered over engine_mp_group
    strategy.setup_inference_engine(args, "hf", actor)
    world, rank = strategy.world_size, strategy.get_rank()
    mine = PROMPTS[rank * len(PROMPTS) // world:(rank + 1) * len(PROMPTS) // world]
    outs = strategy.gather_and_generate({"temperature": 0.0, "max_new_tokens": 4}, all_prompt_token_ids=mine)
    tokens = [o.output_token_ids for o in outs]
    if world > 1:
        import torch.distributed as dist

        parts = [None] * world
        dist.all_gather_object(parts, tokens)
        tokens = [t for part in parts for t in part]
    # save_ckpt(actor.model) after training `actor` keeps the optimizer (the is_actor convention)
    path = strategy.save_ckpt(actor.model, ckpt_dir, client_state={"consumed": micro * MICRO * strategy.world_size})
    # one more step moves the weights, then load_ckpt brings them back
    loss = actor(dataset()[0][None].repeat(MICRO, 1))
    for _ in range(strategy.accumulated_gradient):
        strategy.backward(loss if _ == 0 else actor(dataset()[1][None].repeat(MICRO, 1)), actor, actor_optim)
        strategy.optimizer_step(actor_optim, actor, actor_scheduler, name="actor")
    moved = max((full_weights(strategy, actor)[k] - weights[k]).abs().max().item() for k in weights)
    _, client = strategy.load_ckpt(actor.model, ckpt_dir, optimizer=actor_optim, scheduler=actor_scheduler)
    restored = max((full_weights(strategy, actor)[k] - weights[k]).abs().max().item() for k in weights)
    lr_after_load = actor_scheduler.get_last_lr()[0]
    offloaded = strategy.offload_model(actor)
    reloaded = strategy.reload_model(actor)
    return {
        "losses": losses, "norms": norms, "lrs": lrs, "lr_after_load": lr_after_load,
        "weights": {k: v.double().sum().item() for k, v in weights.items()},
        "weights_l2": sum(v.double().pow(2).sum().item() for v in weights.values()),
        "ema_l2": sum(v.double().pow(2).sum().item() for v in ema_weights.values()),
        "moved_after_save": moved, "restored_diff": restored, "client_state": client,
        "ckpt": os.path.basename(path), "world_size": strategy.world_size,
        "accumulated_gradient": strategy.accumulated_gradient, "offloaded_bytes": offloaded,
        "reloaded_bytes": reloaded, "actor_is_actor": bool(getattr(actor, "is_actor", False)),
        "unwrapped_type": type(strategy.unwrap_model(actor)).__name__,
        "ema_time_steps": strategy.time_steps.get("ema", 0), "engine_tokens": tokens,
        "engine_sleeping": strategy.inference_engine.is_sleeping,
    }


def main() -> None:
    import torch.distributed as dist

    from lightrft_lightning import DeepspeedStrategy, FSDPV2Strategy, get_strategy

    root = Path(sys.argv[1])
    init_path = str(root / "init.pt")
    results = {}
    # FSDP2, the way LightRFT's get_strategy builds it (args.fsdp), meta-initialized actor
    strategy = get_strategy(lightrft_args(fsdp=True, engine_tp_size=2))
    strategy.setup_distributed()
    assert isinstance(strategy, FSDPV2Strategy)
    rank = dist.get_rank()
    results["fsdp"] = train(strategy, init_path, str(root / "fsdp"), meta_init=True)
    results["groups"] = {"mp": dist.get_world_size(strategy.engine_mp_group),
                         "dp": dist.get_world_size(strategy.engine_dp_group)}  # engine_tp_size=2: one engine group
    # prepare_model with per-call shard size and reshard_after_forward (LightRFT's reward models: shard_size=8)
    from lightrft_lightning.tiny_models import tiny_causal_lm

    replicated = strategy.prepare_model(tiny_causal_lm(seed=2), shard_size=1, reshard_after_forward=False)
    sharded = strategy.prepare_model(tiny_causal_lm(seed=2), is_training=True)
    weight = lambda m: m.model.embed_tokens.weight  # noqa: E731
    results["prepare_model"] = {
        "replicated_local_rows": weight(replicated).to_local().shape[0], "mesh": list(weight(replicated).device_mesh.shape),
        "sharded_local_rows": weight(sharded).to_local().shape[0], "full_rows": weight(sharded).shape[0],
        "frozen": not any(p.requires_grad for p in replicated.parameters()) and not replicated.training,
        "trainable": all(p.requires_grad for p in sharded.parameters()),
        "same_logits": torch.allclose(replicated(input_ids=torch.arange(6)[None]).logits,
                                      sharded(input_ids=torch.arange(6)[None]).logits, atol=1e-6),
    }
    # LightRFT's sampler: each rank its part, resumed after consumed_samples over all ranks
    loader = strategy.setup_dataloader(list(range(16)), 2, shuffle=True, consumed_samples=6)
    results["resume"] = strategy.all_gather(torch.tensor([i for b in loader for i in b.tolist()])).tolist()
    full = strategy.setup_dataloader(list(range(16)), 2, shuffle=True)
    results["resume_full"] = strategy.all_gather(torch.tensor([i for b in full for i in b.tolist()])).tolist()
    # DeepSpeed, constructed the LightRFT way (keywords + args)
    for stage in (2, 3):
        args = lightrft_args(zero_stage=stage)
        ds = DeepspeedStrategy(seed=args.seed, max_norm=args.max_norm, micro_train_batch_size=args.micro_train_batch_size,
                               train_batch_size=args.train_batch_size, zero_stage=stage, bf16=False, args=args)
        ds.setup_distributed()
        assert ds.stage == stage and ds.bf16 is False and ds.max_norm == MAX_NORM
        results[f"ds{stage}"] = train(ds, init_path, str(root / f"ds{stage}"), meta_init=stage == 3)
    if rank == 0:
        print("RESULT " + json.dumps(results), flush=True)
    dist.barrier()


if __name__ == "__main__":
    main()

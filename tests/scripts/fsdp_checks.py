"""Standalone (no Trainer) LightRFTFSDP checks on CPU ranks, several per launch because starting
processes dominates the cost. Each check prints one ``TAG {json}`` line on rank 0.

Usage: fsdp_checks.py DIR CHECK [CHECK...] with CHECK in
  equivalence  2-rank fp32 training (accumulation, clipping) against one process on the same global batch (EQUIV)
  seed         the seed's snippets: ``args.fsdp = True``, multi-model prepare, skipped steps, collectives, HSDP (SEED)
  save         train 2 steps with a (model, optimizer, scheduler) tuple, ``save_ckpt`` to DIR (SAVE)
  load         ``load_ckpt`` from DIR with this launch's world size and compare with what ``save`` recorded (LOAD)
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Replicate, Shard

from lightrft_lightning import get_strategy
from lightrft_lightning.strategies.fake import LightRFTFake
from lightrft_lightning.tiny_models import tiny_causal_lm


def report(tag: str, result: dict) -> None:
    if torch.distributed.get_rank() == 0:
        print(f"{tag} " + json.dumps(result), flush=True)
    torch.distributed.barrier()


# ---------------------------------------------------------------- equivalence
STEPS, EQ_BATCH, MICRO, SEQ = 3, 8, 2, 12
EQ_CONFIG = dict(fsdp=True, bf16=False, train_batch_size=EQ_BATCH, micro_train_batch_size=MICRO,
              max_norm=0.5, actor_learning_rate=1e-3, seed=7, dist_timeout_minutes=1.0)


def batches():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 64, (EQ_BATCH, SEQ), generator=gen) for _ in range(STEPS)]


def train(strategy, rows, micro_batches, reduce):
    """Train with the LightRFT calls; ``rows(batch)`` picks this process's part of a global batch."""
    model = tiny_causal_lm(seed=1)
    model = strategy.prepare(model)
    opt = strategy.create_optimizer(model)
    losses, norms = [], []
    for batch in batches():
        step_loss = 0.0
        for i, micro in enumerate(rows(batch).split(MICRO)):
            loss = model(input_ids=micro, labels=micro).loss
            strategy.backward(loss, model, opt)
            if i == 0 and isinstance(model, FSDPModule):
                # non-boundary micro-step: reduce-scattered already, so a rank holds only its gradient shard
                # (no full unsharded gradient kept until the boundary: issue 29, risk 3)
                assert all(isinstance(p.grad, DTensor) for p in model.parameters()), "gradient not reduce-scattered"
            strategy.optimizer_step(opt, model, None)
            step_loss += loss.item() / micro_batches
        losses.append(reduce(step_loss))
        norms.append(strategy.stepper(model).grad_norm)
    return model, losses, norms


def equivalence(root: Path) -> None:
    assert not torch.distributed.is_initialized(), "equivalence must be the first check (its reference has no group)"
    if int(os.environ["RANK"]) == 0:  # the single-process reference, on the whole global batch
        ref_strategy = LightRFTFake(dict(EQ_CONFIG, fsdp=False))
        ref_strategy.setup_distributed()
        ref, ref_losses, ref_norms = train(ref_strategy, lambda b: b, EQ_BATCH // MICRO, float)
    strategy = get_strategy(dict(EQ_CONFIG))
    strategy.setup_distributed()
    world, rank = strategy.dp_world_size, strategy.dp_rank
    assert strategy.accumulation_steps == EQ_BATCH // (MICRO * world)
    per_rank = EQ_BATCH // world
    model, losses, norms = train(strategy, lambda b: b[rank * per_rank:(rank + 1) * per_rank], per_rank // MICRO,
                                 strategy.all_reduce)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    full = dict(strategy.iter_full_params(model))
    result = {}
    if rank == 0:
        result = {"max_loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses)),
                  "max_param_diff": max((full[k] - v).abs().max().item() for k, v in ref.state_dict().items()),
                  "losses": losses, "ref_losses": ref_losses, "grad_norms": norms, "ref_grad_norms": ref_norms,
                  "max_norm": EQ_CONFIG["max_norm"]}
    report("EQUIV", result)


# ---------------------------------------------------------------- seed snippets
def seed_snippets(root: Path) -> None:
    args = argparse.Namespace(train_batch_size=2, micro_train_batch_size=1, dist_timeout_minutes=1.0, my_flag=3)
    args.fsdp = True
    strategy = get_strategy(args)
    strategy.setup_distributed()
    assert type(strategy).__name__ == "LightRFTFSDP" and strategy.config.get_extra_arg("my_flag") == 3
    assert strategy.mp_policy.param_dtype == torch.bfloat16 and strategy.mp_policy.reduce_dtype == torch.float32

    actor, critic, reward, ref = (tiny_causal_lm(seed=s) for s in (1, 2, 3, 1))
    actor_opt = torch.optim.AdamW(actor.parameters(), lr=1e-3)
    (actor, actor_opt, _), critic, reward, ref = strategy.prepare((actor, actor_opt, None), critic, reward, ref,
                                                                 is_rlhf=True)
    for frozen in (critic, reward, ref):
        assert isinstance(frozen, FSDPModule) and not frozen.training
        assert not any(p.requires_grad for p in frozen.parameters())
    critic_opt = strategy.create_optimizer(critic, lr=1e-3)
    assert critic.training and all(p.requires_grad for p in critic.parameters())

    batch = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(strategy.dp_rank))
    with torch.no_grad():
        ref_logits = ref(input_ids=batch).logits
        reward_score = reward(input_ids=batch).logits[:, -1, 0]
    assert ref_logits.dtype == torch.bfloat16  # bf16 compute under bf16-mixed
    assert all(isinstance(p, DTensor) and p.dtype == torch.float32 for p in actor.parameters())  # fp32 master

    before = {k: v.clone() for k, v in strategy.iter_full_params(actor)}
    stepped = []
    for scale in (1.0, 1.0, float("nan"), float("nan")):
        loss = actor(input_ids=batch, labels=batch).loss * scale
        strategy.backward(loss, actor, actor_opt)
        stepped.append(strategy.optimizer_step(actor_opt, actor, None, name="actor"))
        value_loss = critic(input_ids=batch).logits.float().pow(2).mean()
        strategy.backward(value_loss, critic, critic_opt)
        strategy.optimizer_step(critic_opt, critic, None, name="critic")
    after_good = dict(strategy.iter_full_params(actor))
    full = strategy.full_state_dict(actor)

    hsdp = get_strategy({"fsdp": True, "shard_size": 1, "bf16": False, "train_batch_size": 2,
                         "micro_train_batch_size": 1})
    hsdp.setup_distributed()
    model = hsdp.prepare(tiny_causal_lm(seed=4))
    hsdp_opt = hsdp.create_optimizer(model, lr=1e-2)
    hsdp.backward(model(input_ids=batch, labels=batch).loss, model, hsdp_opt)
    hsdp.optimizer_step(hsdp_opt, model, None)
    weight = model.lm_head.weight
    hsdp_params = dict(hsdp.iter_full_params(model))
    replicas_equal = hsdp.all_reduce(hsdp_params["lm_head.weight"], "max").sub(hsdp_params["lm_head.weight"]).abs().max()

    result = {
        "stepped": stepped,
        "skipped_steps": strategy.stepper(actor).skipped_steps,
        "actor_changed": max((after_good[k] - v).abs().max().item() for k, v in before.items()),
        "full_state_dict_matches": (not full) or all(torch.equal(full[k], after_good[k].cpu()) for k in full),
        "all_reduce_mean": strategy.all_reduce({"x": float(strategy.dp_rank)})["x"],
        "all_reduce_max": strategy.all_reduce(torch.tensor([strategy.dp_rank + 1.0]), "max").item(),
        "all_gather": strategy.all_gather(strategy.dp_rank).tolist(),
        "reward_finite": bool(torch.isfinite(reward_score).all()),
        "hsdp_placements": [str(p) for p in weight.placements],
        "hsdp_mesh": list(weight.device_mesh.shape),
        "hsdp_replicas_equal": replicas_equal.item(),
    }
    assert weight.placements == (Replicate(), Shard(0))
    report("SEED", result)


# ---------------------------------------------------------------- checkpoints
CK_BATCH, CK_SEQ = 8, 10
CK_CONFIG = dict(fsdp=True, bf16=False, train_batch_size=CK_BATCH, micro_train_batch_size=1, max_norm=1.0,
              dist_timeout_minutes=1.0)


def step(strategy, model, opt, sched, seed):
    batch = torch.randint(0, 64, (CK_BATCH, CK_SEQ), generator=torch.Generator().manual_seed(seed))
    per_rank = CK_BATCH // strategy.dp_world_size
    for row in batch[strategy.dp_rank * per_rank:(strategy.dp_rank + 1) * per_rank].split(1):
        strategy.backward(model(input_ids=row, labels=row).loss, model, opt)
        strategy.optimizer_step(opt, model, sched)


def full_params(strategy, model):
    return {k: v.clone() for k, v in strategy.full_state_dict(model).items()}  # with 1 rank these alias the params


def full_optimizer_state(model, opt):
    state = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {f"{k}.{name}": v.clone() for k, s in state.get("state", {}).items() for name, v in s.items() if name != "step"}


def prepare_tuple(seed: int):
    strategy = get_strategy(dict(CK_CONFIG))
    strategy.setup_distributed()
    model = tiny_causal_lm(seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01, betas=(0.8, 0.9))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    model, opt, sched = strategy.prepare((model, opt, sched))
    # the optimizer made before sharding is rebound to the DTensor parameters, hyper-parameters kept
    assert opt.param_groups[0]["betas"] == (0.8, 0.9) and sched.optimizer is opt
    assert all(isinstance(p, DTensor) for g in opt.param_groups for p in g["params"])
    return strategy, model, opt, sched


def save(root: Path) -> None:
    strategy, model, opt, sched = prepare_tuple(seed=0)
    step(strategy, model, opt, sched, 1)
    step(strategy, model, opt, sched, 2)
    strategy.save_ckpt(model, str(root / "ckpt"), client_state={"consumed_samples": 16})
    ref = {"params": full_params(strategy, model), "optim": full_optimizer_state(model, opt)}
    step(strategy, model, opt, sched, 3)
    ref["after"] = full_params(strategy, model)
    if strategy.is_rank_0():
        torch.save(ref, root / "ref.pt")
    report("SAVE", {"world": strategy.dp_world_size})


def load(root: Path) -> None:
    strategy, model, opt, sched = prepare_tuple(seed=5)
    path, client = strategy.load_ckpt(model, str(root / "ckpt"))
    params, optim = full_params(strategy, model), full_optimizer_state(model, opt)
    step(strategy, model, opt, sched, 3)  # the restored optimizer and scheduler continue the saved run
    after = full_params(strategy, model)
    result = {"world": strategy.dp_world_size, "client_state": client, "tag": Path(path).name,
              "steps": strategy.stepper(model).steps, "sched_last_epoch": sched.last_epoch}
    if strategy.is_rank_0():
        ref = torch.load(root / "ref.pt", weights_only=True)
        result["optim_entries"] = [len(optim), len(ref["optim"])]
        for key, got in (("params", params), ("optim", optim), ("after", after)):
            result[f"max_{key}_diff"] = max((got[k] - v).abs().max().item() for k, v in ref[key].items())
    report("LOAD", result)


CHECKS = {"equivalence": equivalence, "seed": seed_snippets, "save": save, "load": load}

if __name__ == "__main__":
    root, checks = Path(sys.argv[1]), sys.argv[2:]
    unknown = set(checks) - set(CHECKS)
    if unknown or not checks:
        sys.exit(f"unknown checks {sorted(unknown)}; accepted: {', '.join(CHECKS)}")
    for name in checks:
        CHECKS[name](root)

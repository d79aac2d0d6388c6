"""GRPO and PPO as LightningModules under Trainer.fit: learning, batching, resume, strategies."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightrft_lightning import LightRFTFake
from lightrft_lightning.algorithms import (GRPO, PPO, Advantages, Experience, GRPOLoss, Policy, RLModule, Rollout,
                                           Training)
from lightrft_lightning.engines.base import Completion
from lightrft_lightning.data import PromptDataModule
from lightrft_lightning.tasks import counting_prompts
from tests.launch import torchrun

ROOT = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import grpo_strategies  # noqa: E402  (also the 2-rank script)

torch.set_num_threads(1)


class Recorder(Callback):
    """Keeps the logged metrics and the prompt indices of every step."""

    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []
        self.indices: list[list[int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})
        self.indices.append(batch["index"].tolist())


def fit(model, data, steps, callbacks=(), ckpt_path=None, **kwargs):
    recorder = Recorder()
    trainer = pl.Trainer(accelerator="cpu", strategy=LightRFTFake(), max_steps=steps, logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=kwargs.pop("enable_checkpointing", False),
                         callbacks=[recorder, *callbacks], **kwargs)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer, recorder


def count_manual_optimization_calls(monkeypatch) -> dict[str, list]:
    """Record the stepper of every ``manual_backward`` and ``LightningOptimizer.step`` call."""
    from lightning.pytorch.core.optimizer import LightningOptimizer

    calls: dict[str, list] = {"manual_backward": [], "optimizer.step": []}
    manual_backward, step = pl.LightningModule.manual_backward, LightningOptimizer.step

    def spy_backward(self, loss, *args, **kwargs):
        calls["manual_backward"].append(kwargs.get("stepper"))
        return manual_backward(self, loss, *args, **kwargs)

    def spy_step(self, closure=None, **kwargs):
        calls["optimizer.step"].append(kwargs.get("stepper"))
        return step(self, closure, **kwargs)

    monkeypatch.setattr(pl.LightningModule, "manual_backward", spy_backward)
    monkeypatch.setattr(LightningOptimizer, "step", spy_step)
    return calls


def tiny_grpo(**kwargs):
    defaults = dict(tokenizer_chars="0123456789", model_config={"hidden_size": 64, "intermediate_size": 128},
                    n_samples_per_prompt=8, max_new_tokens=4, micro_train_batch_size=64,
                    actor_learning_rate=3e-3, clip_high=0.28)
    return GRPO(**{**defaults, **kwargs})


def test_grpo_learns_the_counting_task():
    pl.seed_everything(0, verbose=False)
    _, rec = fit(tiny_grpo(), PromptDataModule(prompts=counting_prompts(1024, seed=0), batch_size=8), 60)
    rewards = [m["reward"] for m in rec.metrics]
    start, end = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert start < 0.15, rewards[:10]  # about 1/13: a random model over 13 tokens
    assert end > start + 0.15, (start, end)
    assert 1.0 <= rec.metrics[-1]["response_length"] <= 4.0
    for key in ("entropy", "clip_frac", "adv_std", "reward_std", "perf/tokens_per_s", "time/generate",
                "time/train", "rollout/sync_s", "rollout/generate_s", "actor/grad_norm"):
        assert key in rec.metrics[-1], key


@pytest.mark.parametrize("variant", [
    dict(advantage_estimator="dr_grpo", loss_agg="constant"),
    dict(advantage_estimator="rloo", loss_agg="sequence", kl_coef=0.1, kl_estimator="k1"),
    dict(advantage_estimator="reinforce++_baseline", kl_coef=0.1, kl_in_reward=True, kl_estimator="k3"),
])
def test_micro_batches_accumulate_into_the_configured_optimizer_steps(variant, monkeypatch):
    # 4 prompts x 8 samples = 32 per step; micro 8, train_batch_size 16 -> 2 optimizer steps per pass, 2 passes
    calls = count_manual_optimization_calls(monkeypatch)
    pl.seed_everything(0, verbose=False)
    model = tiny_grpo(micro_train_batch_size=8, train_batch_size=16, epochs=2, **variant)
    before = {n: p.detach().clone() for n, p in model.actor.named_parameters()}
    trainer, rec = fit(model, PromptDataModule(prompts=counting_prompts(64), batch_size=4), 3)
    state = trainer.strategy.stepper(model.actor)
    assert (state.steps, state.micro_steps) == (3 * 2 * 2, 3 * 4 * 2)
    # every micro-batch went through Lightning's manual optimization, with the actor's stepper
    assert calls == {"manual_backward": [state] * 3 * 4 * 2, "optimizer.step": [state] * 3 * 4 * 2}
    assert trainer.global_step == 3
    assert trainer.strategy.config.accumulation_steps(1) == 2
    assert any(not torch.equal(before[n], p) for n, p in model.actor.named_parameters())
    if variant.get("kl_coef"):
        assert rec.metrics[-1]["kl"] != 0  # the policy moved away from the frozen reference (k1 may be < 0)
        assert all(not p.requires_grad for p in model.ref.parameters())


def _storages(module):
    return {p.untyped_storage().data_ptr() for p in module.parameters()}


def test_reference_shares_the_actors_tensors_until_fit_then_stays_the_initial_policy(tmp_path):
    # issue 29, risk 4: no second full copy of the weights per rank before the strategy shards them
    pl.seed_everything(0, verbose=False)
    model = tiny_grpo(kl_coef=0.1, kl_estimator="k1", micro_train_batch_size=32)
    assert _storages(model.ref) == _storages(model.actor)
    initial = {n: p.detach().clone() for n, p in model.ref.named_parameters()}
    data = PromptDataModule(prompts=counting_prompts(64), batch_size=4)
    trainer, _ = fit(model, data, 2)
    assert not _storages(model.ref) & _storages(model.actor)  # one process: copied at fit start
    assert all(torch.equal(initial[n], p) for n, p in model.ref.named_parameters())
    assert any(not torch.equal(initial[n], p) for n, p in model.actor.named_parameters())
    # resuming loads before setup, into the module as built: the checkpoint's reference must not land
    # in the actor's tensors
    trainer.save_checkpoint(tmp_path / "ckpt")
    pl.seed_everything(1, verbose=False)
    resumed = tiny_grpo(kl_coef=0.1, kl_estimator="k1", micro_train_batch_size=32)
    fit(resumed, data, 2, ckpt_path=str(tmp_path / "ckpt"))
    for name, p in resumed.actor.named_parameters():
        assert torch.equal(p, dict(model.actor.named_parameters())[name]), name
    assert all(torch.equal(initial[n], p) for n, p in resumed.ref.named_parameters())


@pytest.mark.parametrize("loss_agg", ["token", "sequence"])
def test_samples_with_zero_advantage_are_not_forwarded_and_change_nothing(loss_agg, monkeypatch):
    # a random model rarely counts right: most groups of 4 tie at reward 0, so their advantages are 0
    def run():
        pl.seed_everything(0, verbose=False)
        model = tiny_grpo(n_samples_per_prompt=4, micro_train_batch_size=8, loss_agg=loss_agg)
        rows: list[int] = []
        model.actor.register_forward_pre_hook(
            lambda _, args, kwargs: rows.append(kwargs["input_ids"].shape[0]) if torch.is_grad_enabled() else None,
            with_kwargs=True)
        grads: dict[str, list[torch.Tensor]] = {}
        for name, p in model.actor.named_parameters():
            p.register_post_accumulate_grad_hook(lambda p, name=name: grads.setdefault(name, []).append(p.grad.clone()))
        _, rec = fit(model, PromptDataModule(prompts=counting_prompts(64), batch_size=8), 1)
        return rec.metrics[0], rows, grads

    metrics, rows, grads = run()
    monkeypatch.setattr("lightrft_lightning.algorithms.module.with_advantage", lambda mask, advantages: mask)
    full_metrics, full_rows, full_grads = run()
    assert 0 < metrics["groups/all_tied"] < 1
    assert sum(rows) < sum(full_rows), (rows, full_rows)
    for key in ("reward", "loss/policy"):
        assert metrics[key] == pytest.approx(full_metrics[key], rel=1e-5, abs=1e-8), key
    assert grads.keys() == full_grads.keys()
    largest = max(float(g.abs().max()) for gs in full_grads.values() for g in gs)
    assert largest > 0
    for name in grads:  # micro-batches whose samples all tie still run a backward: every gradient is there
        for g, full in zip(grads[name], full_grads[name], strict=True):
            torch.testing.assert_close(g, full, rtol=1e-5, atol=1e-6 * largest, msg=name)


def test_sizes_that_do_not_divide_are_refused():
    with pytest.raises(ValueError, match="train_batch_size=20 is not divisible by micro_train_batch_size=8"):
        fit(tiny_grpo(micro_train_batch_size=8, train_batch_size=20), PromptDataModule(prompts=counting_prompts(64),
                                                                                     batch_size=4), 1)
    # 24 = 3 micro-batches of 8, but a 32-sample rollout is not a whole number of such steps
    with pytest.raises(ValueError, match="rollout of 32 samples per rank does not split into optimizer steps of 24"):
        fit(tiny_grpo(micro_train_batch_size=8, train_batch_size=24), PromptDataModule(prompts=counting_prompts(64),
                                                                                     batch_size=4), 1)


def test_needs_a_lightrft_strategy():
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="needs a LightRFT strategy.*lightrft_fake"):
        trainer.fit(tiny_grpo(), PromptDataModule(prompts=counting_prompts(64), batch_size=4))


def test_bad_hyperparameters_name_the_field():
    with pytest.raises(ValueError, match="GRPO.advantage_estimator='gae' is invalid; accepted: group_norm"):
        GRPO(advantage_estimator="gae")
    with pytest.raises(ValueError, match="GRPO.loss_agg='sum' is invalid"):
        GRPO(loss_agg="sum")
    with pytest.raises(ValueError, match="SamplingParams.top_p"):
        GRPO(top_p=0.0)


def test_rlmodule_from_parts_trains_exactly_as_grpo_from_flat_arguments():
    """``GRPO(**flat)`` is ``RLModule`` with a ``GRPOLoss`` and the parts its flat arguments name."""
    flat = dict(n_samples_per_prompt=4, micro_train_batch_size=8, train_batch_size=16, kl_coef=0.1, kl_estimator="k2",
                advantage_estimator="rloo", reward_clip=0.9, lr_scheduler="cosine", lr_warmup_ratio=0.2)
    parts = dict(
        loss=GRPOLoss(clip_high=0.28, kl_coef=0.1, kl_estimator="k2"),
        policy=Policy(tokenizer_chars="0123456789", model_config={"hidden_size": 64, "intermediate_size": 128}),
        rollout=Rollout(n_samples_per_prompt=4, max_new_tokens=4),
        advantages=Advantages(estimator="rloo", reward_clip=0.9),
        training=Training(micro_train_batch_size=8, train_batch_size=16, actor_learning_rate=3e-3,
                          lr_scheduler="cosine", lr_warmup_ratio=0.2))
    runs = []
    for build in (lambda: tiny_grpo(**flat), lambda: RLModule(**parts)):
        pl.seed_everything(0, verbose=False)
        model = build()
        _, rec = fit(model, PromptDataModule(prompts=counting_prompts(64), batch_size=4), 3)
        steps = [{k: v for k, v in m.items() if not k.startswith(("time/", "perf/", "rollout/"))} for m in rec.metrics]
        runs.append((steps, [p.detach().clone() for p in model.actor.parameters()]))
    (flat_steps, flat_params), (part_steps, part_params) = runs
    assert flat_steps == part_steps and flat_steps[0]["kl"] >= 0
    assert all(torch.equal(a, b) for a, b in zip(flat_params, part_params, strict=True))


class ScriptedRollout(Rollout):
    """A rollout without an engine: each prompt gets the completions "12" and "3", rewarded 1 and 0."""

    def __call__(self, module, rows):
        _, prompt_ids = self.render(rows)
        tokens = [self.tokenizer.convert_tokens_to_ids(list(text)) for text in ("12", "3")]
        completions = [Completion(i, tokens[j % 2]) for i in range(len(rows)) for j in range(self.n_samples_per_prompt)]
        exp = Experience(*(t.to(module.device) for t in self._pack(prompt_ids, completions)))
        exp.rewards = torch.tensor([1.0 - j % 2 for _ in rows for j in range(self.n_samples_per_prompt)],
                                   device=module.device)
        return exp, {}


def test_the_learner_trains_on_experience_from_any_rollout():
    pl.seed_everything(0, verbose=False)
    model = RLModule(GRPOLoss(), Policy(tokenizer_chars="0123456789", model_config={"hidden_size": 32}),
                     ScriptedRollout(n_samples_per_prompt=2, max_new_tokens=2),
                     training=Training(micro_train_batch_size=8, actor_learning_rate=1e-2))
    before = [p.detach().clone() for p in model.actor.parameters()]
    _, rec = fit(model, PromptDataModule(prompts=counting_prompts(16), batch_size=4), 2)
    assert [m["reward"] for m in rec.metrics] == [0.5, 0.5]
    assert [m["response_length"] for m in rec.metrics] == [1.5, 1.5]
    assert rec.metrics[-1]["loss/policy"] != 0
    assert any(not torch.equal(a, p) for a, p in zip(before, model.actor.parameters()))


def test_resume_neither_replays_nor_skips_prompts(tmp_path):
    # 20 prompts, 4 per step: an epoch is 5 steps; stop after 3, resume, run to 8 (across an epoch)
    data = lambda: PromptDataModule(prompts=counting_prompts(20), batch_size=4, seed=5)  # noqa: E731
    pl.seed_everything(0, verbose=False)
    _, full = fit(tiny_grpo(n_samples_per_prompt=2, micro_train_batch_size=8), data(), 8)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    pl.seed_everything(0, verbose=False)
    _, first = fit(tiny_grpo(n_samples_per_prompt=2, micro_train_batch_size=8), data(), 3,
                   callbacks=[ckpt], enable_checkpointing=True)
    path = next(tmp_path.glob("*step=3*.ckpt"))
    resumed, second = fit(tiny_grpo(n_samples_per_prompt=2, micro_train_batch_size=8), data(), 8, ckpt_path=str(path))
    assert first.indices + second.indices == full.indices
    # the step counters continue from the checkpoint (configure_optimizers runs after it is loaded)
    assert resumed.strategy.stepper(resumed.lightning_module.actor).steps == 8
    assert sorted(i for step in full.indices[:5] for i in step) == list(range(20))


def test_ppo_trains_actor_and_critic_with_a_reward_model(tmp_path, monkeypatch):
    from transformers import Qwen2ForSequenceClassification

    from lightrft_lightning.tiny_models import tiny_qwen2_config
    from lightrft_lightning.tokenizer import char_tokenizer

    tok = char_tokenizer("0123456789")
    torch.manual_seed(1)
    Qwen2ForSequenceClassification(tiny_qwen2_config(vocab_size=len(tok), num_labels=1,
                                                     pad_token_id=tok.pad_token_id)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    pl.seed_everything(0, verbose=False)
    model = PPO(tokenizer_chars="0123456789", n_samples_per_prompt=2, max_new_tokens=4, micro_train_batch_size=8,
                epochs=2, kl_coef=0.05, actor_learning_rate=1e-3, critic_learning_rate=1e-2,
                rewards={"lightrft_lightning.tasks:counting_reward": 1.0, str(tmp_path): 0.5})
    head = model.critic.value_head.weight.detach().clone()
    calls = count_manual_optimization_calls(monkeypatch)
    trainer, rec = fit(model, PromptDataModule(prompts=counting_prompts(32), batch_size=4), 2)
    assert trainer.global_step == 2
    actor, critic = trainer.strategy.stepper(model.actor), trainer.strategy.stepper(model.critic)
    assert actor.steps == critic.steps == 2 * 2  # one optimizer step per pass, for each model
    assert calls["manual_backward"] == calls["optimizer.step"] == [actor, critic] * 2 * 2
    assert not torch.equal(head, model.critic.value_head.weight)
    assert len(trainer.optimizers) == 2
    assert trainer.optimizers[1].param_groups[0]["lr"] == 1e-2
    last = rec.metrics[-1]
    assert torch.isfinite(torch.tensor([last["loss/value"], last["loss/policy"], last["kl"]])).all()


_M = "--model.init_args."
LORA = (f'{_M}lora={{"r": 4, "alpha": 8}}',
        f'{_M}model_config={{"hidden_size": 64, "intermediate_size": 128, "tie_word_embeddings": true}}')
ZERO3 = ('--trainer.strategy.init_args.config={"zero_stage": 3, "bf16": false}',)


# the off-policy losses, each on one strategy, against an engine made stale by STALE (grpo_strategies.StaleEngine)
STALE = 0.4
GSPO_TIS_MIS = (f"{_M}policy_loss_type=gspo", f"{_M}rollout_is=sequence", f"{_M}rollout_is_threshold=1.5",
                f"{_M}rollout_rs=token", f"{_M}rollout_rs_threshold=1.3", f"{_M}rollout_rs_threshold_lower=0.8")
TIS_MIS = (f"{_M}rollout_is=token", f"{_M}rollout_is_threshold=1.2", f"{_M}rollout_rs=geometric",
           f"{_M}rollout_rs_threshold=1.1")
GSPO_GEOMETRIC = (f"{_M}policy_loss_type=gspo", f"{_M}rollout_is=geometric", f"{_M}rollout_is_threshold=1.1",
                  f"{_M}rollout_rs=sequence", f"{_M}rollout_rs_threshold=2.0")
MISMATCH = ("mismatch/logp_abs_diff", "mismatch/kl", "mismatch/ratio_max", "mismatch/tokens_truncated",
            "mismatch/seqs_truncated", "mismatch/tokens_masked", "mismatch/seqs_masked")


@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy, extra, adapters", [
    ("fsdp", LORA + GSPO_TIS_MIS, ["DTensor"]), ("deepspeed", LORA + TIS_MIS, ["plain"]),
    ("deepspeed", LORA + ZERO3 + GSPO_GEOMETRIC, ["zero3"]),
], ids=["fsdp-lora-gspo-tis-mis", "deepspeed-lora-tis-mis", "deepspeed-zero3-lora-gspo-geometric"])
def test_two_rank_examples_give_the_same_steps_as_one_process(strategy, extra, adapters, tmp_path, monkeypatch):
    """examples/grpo_tiny_{fsdp,deepspeed}.yaml on 2 ranks against examples/grpo_tiny_fake.yaml, with LoRA
    adapters on a tied model (adapters sharded with their blocks, or partitioned), GSPO or PPO's ratio,
    and truncated and masked importance sampling against a stale engine. A full fine-tune on 2
    ranks against one process: tests/test_real_model.py (GRPO), tests/test_fsdp.py, tests/test_deepspeed.py."""
    module = f"lightrft_lightning.strategies.{strategy}"
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not in this checkout yet")
    monkeypatch.chdir(ROOT)
    out = tmp_path / "steps.json"
    torchrun("grpo_strategies.py", 2, f"examples/grpo_tiny_{strategy}.yaml", str(out), str(grpo_strategies.STEPS),
             *extra, env={"PYTHONPATH": ROOT, "SHIFT_ENGINE_LOGPROBS": str(STALE)}, timeout=300)
    result = json.loads(out.read_text())
    assert result["adapters"] == adapters  # sharded with their blocks / partitioned
    ranks = result["steps"]
    one = grpo_strategies.run("examples/grpo_tiny_fake.yaml", extra=tuple(a for a in extra if a not in ZERO3),
                              shift=STALE).steps
    assert len(ranks) == len(one) == grpo_strategies.STEPS
    for got, ref in zip(ranks, one):
        for key in ("loss/policy", "actor/grad_norm", "kl", "reward", "reward_std", "clip_frac", *MISMATCH):
            assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key
    assert one[0]["loss/policy"] != 0 and one[0]["actor/grad_norm"] > 0
    # the corrections acted: some tokens truncated, some masked, ratios up to about e^0.4
    assert all(0 < one[0][f"mismatch/{k}"] < 1 for k in ("tokens_truncated", "tokens_masked")), one[0]
    assert one[0]["mismatch/ratio_max"] == pytest.approx(math.exp(STALE), rel=1e-3)

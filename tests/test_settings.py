"""Each training setting of GRPO/PPO and of StrategyConfig has a measured effect, or a clear error:
learning-rate schedule (warmup, cosine, real steps only, resume), gradient checkpointing, the
rollout engine the callback builds, and the rollout batch sizes."""

from __future__ import annotations

import math
import shutil
import sys
import types
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint
from torch.utils.data import DataLoader

from lightrft_lightning import LightRFTFake, checkpoint
from lightrft_lightning.algorithms import GRPO, PPO
from lightrft_lightning.callbacks import DCPCheckpoint, RolloutEngineCallback
from lightrft_lightning.data import PromptDataModule, PromptDataset, collate_prompts
from lightrft_lightning.engines import HFEngine, SGLangEngine, VLLMEngine
from lightrft_lightning.tasks import counting_prompts
from lightrft_lightning.tiny_models import tiny_causal_lm
from lightrft_lightning.tokenizer import char_tokenizer

torch.set_num_threads(1)
LR = 1e-2


class LearningRates(Callback):
    """The learning rate of each optimizer at each of its real steps (an optimizer step pre-hook)."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.lrs = [[] for _ in trainer.optimizers]
        for record, optimizer in zip(self.lrs, trainer.optimizers):
            optimizer.register_step_pre_hook(lambda opt, args, kwargs, record=record:
                                             record.append(opt.param_groups[0]["lr"]))


def tiny(cls: type = GRPO, **kwargs: Any) -> GRPO:
    # 4 prompts x 2 samples = 8 per step; micro 4, train_batch_size 4: 2 optimizer steps per pass
    defaults = dict(tokenizer_chars="0123456789", model_config={"hidden_size": 32}, n_samples_per_prompt=2,
                    max_new_tokens=4, micro_train_batch_size=4, train_batch_size=4, actor_learning_rate=LR)
    return cls(**{**defaults, **kwargs})


def fit(model: pl.LightningModule, steps: int, config: Any = None, callbacks: Sequence[Callback] = (),
        data: Any = None, ckpt_path: Optional[str] = None, **trainer_kwargs: Any) -> tuple[pl.Trainer, LearningRates]:
    lrs = LearningRates()
    trainer = pl.Trainer(accelerator="cpu", strategy=LightRFTFake(config), max_steps=steps, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, enable_checkpointing=any(isinstance(c, Checkpoint) for c in callbacks),
                         callbacks=[lrs, *callbacks], **trainer_kwargs)
    data = data if data is not None else PromptDataModule(prompts=counting_prompts(32, seed=1), batch_size=4)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer, lrs


def closed_form(step: int, total: int, warmup: int, cosine: bool, lr: float = LR, min_ratio: float = 0.1) -> float:
    if step < warmup:
        return lr * step / warmup
    if not cosine:
        return lr
    progress = (step - warmup) / (total - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------- learning-rate schedule
def test_default_schedule_is_a_constant_learning_rate():
    pl.seed_everything(0, verbose=False)
    trainer, lrs = fit(tiny(), 3)
    assert lrs.lrs == [[LR] * 6]  # bit-exact: the defaults change no number of a run without a schedule
    (config,) = trainer.lr_scheduler_configs
    assert isinstance(config.scheduler, torch.optim.lr_scheduler.LambdaLR) and config.interval == "step"
    assert trainer.strategy.config.lr_warmup_ratio == 0.0  # the module's value, not StrategyConfig's 0.03


def test_grpo_lr_warms_up_then_follows_the_cosine():
    pl.seed_everything(0, verbose=False)
    model = tiny(lr_scheduler="cosine", lr_warmup_ratio=0.25, min_lr_ratio=0.2)
    trainer, lrs = fit(model, 5)
    total, warmup = 5 * 2, 3  # 5 training steps x 2 optimizer steps; ceil(0.25 x 10)
    assert model.num_optimizer_steps() == total
    expected = [closed_form(i, total, warmup, cosine=True, min_ratio=0.2) for i in range(total)]
    assert lrs.lrs[0] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert lrs.lrs[0][:4] == pytest.approx([0.0, LR / 3, 2 * LR / 3, LR])
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == total
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.2 * LR)  # the end of the cosine
    assert trainer.strategy.stepper(model.actor).scheduler is scheduler  # handed to strategy.optimizer_step
    assert trainer.strategy.config.lr_warmup_ratio == 0.25


def test_ppo_schedules_the_actor_and_the_critic():
    pl.seed_everything(0, verbose=False)
    model = tiny(PPO, critic_learning_rate=0.1, lr_warmup_ratio=0.5, epochs=2)
    trainer, lrs = fit(model, 2)
    total, warmup = 2 * 2 * 2, 4  # 2 training steps x 2 epochs x 2 optimizer steps
    assert lrs.lrs == [[closed_form(i, total, warmup, cosine=False) for i in range(total)],
                       [closed_form(i, total, warmup, cosine=False, lr=0.1) for i in range(total)]]
    assert [c.name for c in trainer.lr_scheduler_configs] == ["actor/lr", "critic/lr"]
    assert [c.scheduler.last_epoch for c in trainer.lr_scheduler_configs] == [total, total]
    assert trainer.strategy.config.critic_learning_rate == 0.1  # the module's value is the config's


def test_ppo_refuses_a_strategy_critic_learning_rate_it_would_overwrite():
    with pytest.raises(ValueError, match=r"StrategyConfig.critic_learning_rate=0.5 \(the strategy's config\) "
                                         r"disagrees with the module's 0.1 \(PPO.critic_learning_rate\)"):
        fit(tiny(PPO, critic_learning_rate=0.1), 1, config={"critic_learning_rate": 0.5})


def test_scheduler_steps_only_on_real_optimizer_steps():
    # train_batch_size 8 = 2 micro-batches of 4: one optimizer step per pass, 2 passes per training step
    pl.seed_everything(0, verbose=False)
    model = tiny(train_batch_size=8, epochs=2, lr_scheduler="cosine", lr_warmup_ratio=0.2)
    backward_calls = []

    def nan_on_fifth_backward(grad: torch.Tensor) -> torch.Tensor:
        backward_calls.append(1)
        return torch.full_like(grad, float("nan")) if len(backward_calls) == 5 else grad

    model.actor.lm_head.weight.register_hook(nan_on_fifth_backward)
    trainer, lrs = fit(model, 3)
    state = trainer.strategy.stepper(model.actor)
    total, warmup = 3 * 2, 2
    assert (trainer.global_step, state.micro_steps, state.steps, state.skipped_steps) == (3, 12, 5, 1)
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 5  # not 12 micro-steps, 6 attempts or 3 steps
    assert lrs.lrs[0] == pytest.approx([closed_form(i, total, warmup, cosine=True) for i in range(5)], rel=1e-12)


@pytest.mark.parametrize("saver", ["lightning", "dcp"])
def test_schedule_resumes_where_it_stopped(tmp_path, saver):
    def run(callbacks, ckpt_path=None):
        pl.seed_everything(0, verbose=False)
        return fit(tiny(lr_scheduler="cosine", lr_warmup_ratio=0.5), 4, callbacks=callbacks, ckpt_path=ckpt_path,
                   default_root_dir=tmp_path)

    if saver == "lightning":
        _, straight = run([ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)])
        trainer, resumed = run([], ckpt_path=str(next(tmp_path.glob("*step=2*.ckpt"))))
    else:
        _, straight = run([DCPCheckpoint(tmp_path / "a", every_n_train_steps=2)])
        shutil.copytree(tmp_path / "a" / "global_step2", tmp_path / "b" / "global_step2")
        checkpoint.write_latest(tmp_path / "b", "global_step2")
        trainer, resumed = run([DCPCheckpoint(tmp_path / "b", every_n_train_steps=0, save_on_train_end=False)])
    assert len(straight.lrs[0]) == 8 and straight.lrs[0][0] == 0.0
    assert resumed.lrs[0] == straight.lrs[0][4:]  # a fresh schedule would restart the warmup at 0
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 8


def test_bad_schedule_values_name_the_field():
    with pytest.raises(ValueError, match=r"GRPO.lr_scheduler='foo' is invalid; accepted: constant, cosine"):
        tiny(lr_scheduler="foo")
    with pytest.raises(ValueError, match=r"GRPO.lr_warmup_ratio=1.5 is invalid; accepted: a number in \[0, 1\]"):
        tiny(lr_warmup_ratio=1.5)
    with pytest.raises(ValueError, match=r"GRPO.min_lr_ratio=1.5 is invalid; accepted: a number in \[0, 1\]"):
        tiny(min_lr_ratio=1.5, lr_scheduler="cosine")
    with pytest.raises(ValueError, match=r"GRPO.min_lr_ratio=0.5 is only used by lr_scheduler='cosine'"):
        tiny(min_lr_ratio=0.5)
    with pytest.raises(ValueError, match=r"PPO.gradient_checkpointing='yes' is invalid; accepted: True or False"):
        tiny(PPO, gradient_checkpointing="yes")
    with pytest.raises(ValueError, match=r"lr_scheduler='cosine' .* needs the number of training steps.*max_steps"):
        fit(tiny(lr_scheduler="cosine"), -1, max_epochs=-1)


def test_strategy_config_that_would_be_overwritten_is_refused():
    with pytest.raises(ValueError, match=r"StrategyConfig.lr_warmup_ratio=0.2 \(the strategy's config\) disagrees "
                                         r"with the module's 0.0 \(GRPO.lr_warmup_ratio\)"):
        fit(tiny(), 1, config={"lr_warmup_ratio": 0.2})
    with pytest.raises(ValueError, match=r"StrategyConfig.rollout_batch_size=16 .* module's 4 "
                                         r"\(prompts per step x ranks\)"):
        fit(tiny(), 1, config={"rollout_batch_size": 16})
    trainer, _ = fit(tiny(lr_warmup_ratio=0.2, gradient_checkpointing=True), 1,
                     config={"lr_warmup_ratio": 0.2, "gradient_checkpointing": True})  # agreeing values are fine
    assert trainer.strategy.config.gradient_checkpointing is True


# ---------------------------------------------------------------------------- gradient checkpointing
class SavedActivations(torch.autograd.graph.saved_tensors_hooks):
    """Bytes of the distinct non-parameter tensors autograd keeps for the backward pass."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.storages: dict[int, int] = {}
        super().__init__(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


def test_gradient_checkpointing_same_gradients_less_activation_memory():
    shapes = dict(model_config={"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4})
    plain, ckpt = tiny(**shapes), tiny(**shapes, gradient_checkpointing=True)
    ckpt.actor.load_state_dict(plain.actor.state_dict())
    assert not plain.actor.model.gradient_checkpointing and ckpt.actor.model.gradient_checkpointing
    ids = torch.randint(1, len(plain.tokenizer), (8, 64), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    weights = torch.randn(8, 63, generator=torch.Generator().manual_seed(1))
    results = {}
    for name, module in (("plain", plain), ("checkpointed", ckpt)):
        module.train()
        saved = SavedActivations(list(module.actor.parameters()))
        with saved:
            logp, _ = module.log_probs(module.actor, ids, mask)
            loss = (logp * weights).mean()
        loss.backward()
        results[name] = (loss.item(), {n: p.grad for n, p in module.actor.named_parameters()}, saved.nbytes)
    (loss_a, grads_a, bytes_a), (loss_b, grads_b, bytes_b) = results["plain"], results["checkpointed"]
    assert abs(loss_a - loss_b) <= 1e-6
    assert max((grads_a[n] - grads_b[n]).abs().max().item() for n in grads_a) <= 1e-6
    assert bytes_b < 0.25 * bytes_a  # measured: 13,592,128 B plain, 951,872 B checkpointed


def test_gradient_checkpointing_trains_ppo_with_the_hf_engine():
    pl.seed_everything(0, verbose=False)
    model = tiny(PPO, gradient_checkpointing=True)
    backbone = model.critic.model
    assert model.critic.is_gradient_checkpointing and all(layer.gradient_checkpointing for layer in backbone.layers)
    trainer, _ = fit(model, 2)
    assert trainer.strategy.config.gradient_checkpointing is True
    assert trainer.strategy.stepper(model.actor).steps == trainer.strategy.stepper(model.critic).steps == 4
    assert model.actor.config.use_cache  # the engine's generation keeps its KV cache; training forwards pass none


# ---------------------------------------------------------------------------- rollout engine
def _trainer(config: dict) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", strategy=LightRFTFake(config), logger=False, enable_checkpointing=False)


@pytest.fixture
def hf_dir(tmp_path):
    tok = char_tokenizer("0123456789")
    tiny_causal_lm(vocab_size=len(tok)).save_pretrained(tmp_path)
    return str(tmp_path)


class Recording:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs


def test_engine_type_hf_builds_the_hf_engine():
    module = tiny()
    engine = RolloutEngineCallback()._build_engine(_trainer({}), module)
    # one process, the actor's dtype: the engine generates from the actor's own tensors (no copy to push)
    assert isinstance(engine, HFEngine) and engine.weights_valid
    assert {p.data_ptr() for p in engine.model.parameters()} == {p.data_ptr() for p in module.actor.parameters()}
    with pytest.raises(ValueError, match=r"StrategyConfig.engine_tp_size=2 would be ignored: engine_type='hf'"):
        RolloutEngineCallback()._build_engine(_trainer({"engine_tp_size": 2}), module)
    with pytest.raises(ValueError, match=r"StrategyConfig.engine_mem_util=0.3 would be ignored"):
        RolloutEngineCallback()._build_engine(_trainer({"engine_mem_util": 0.3}), module)


def test_engine_type_vllm_and_sglang_build_with_tp_size_and_memory(hf_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=Recording))
    monkeypatch.setitem(sys.modules, "sglang", types.SimpleNamespace(Engine=Recording))
    module = tiny(model=hf_dir, model_config=None, tokenizer="char")
    config = {"engine_tp_size": 2, "engine_mem_util": 0.3, "seed": 7}
    vllm = RolloutEngineCallback(sleep_level=2)._build_engine(_trainer({**config, "engine_type": "vllm"}), module)
    assert isinstance(vllm, VLLMEngine) and not vllm.weights_survive_sleep
    assert vllm.llm.kwargs == {"model": hf_dir, "enable_sleep_mode": True, "tensor_parallel_size": 2,
                               "gpu_memory_utilization": 0.3, "dtype": "float32", "seed": 7,
                               "distributed_executor_backend": "external_launcher",
                               "skip_tokenizer_init": True,  # the actor's fp32; this directory has no tokenizer
                               "logprobs_mode": "processed_logprobs"}  # log-probs of the sampled distribution
    sglang = RolloutEngineCallback()._build_engine(_trainer({**config, "engine_type": "sglang"}), module)
    assert isinstance(sglang, SGLangEngine)
    # sleep level 2 by default for SGLang (its weights are pushed before each rollout): no CPU backup
    assert sglang.engine.kwargs == {"model_path": hf_dir, "enable_memory_saver": True,
                                    "enable_weights_cpu_backup": False, "tp_size": 2, "mem_fraction_static": 0.3,
                                    "random_seed": 7, "dtype": "float32"}  # the actor's, as for vLLM
    with pytest.raises(ValueError, match=r"engine_type='vllm' loads the actor's Hugging Face directory, but the "
                                         r"actor's config.name_or_path is ''"):
        RolloutEngineCallback()._build_engine(_trainer({"engine_type": "vllm"}), tiny())


@pytest.mark.parametrize("engine_type", ["vllm", "sglang"])
def test_engine_type_without_its_package_is_a_clear_error(engine_type, monkeypatch):
    monkeypatch.setitem(sys.modules, engine_type, None)  # not importable, even where it is installed
    with pytest.raises(ImportError) as err:
        fit(tiny(), 1, config={"engine_type": engine_type})
    message = str(err.value)
    assert f"StrategyConfig.engine_type='{engine_type}' needs the {engine_type} package" in message
    assert f"pip install 'lightrft-lightning[{engine_type}]'" in message
    assert "accepted: 'vllm', 'sglang', 'hf'" in message


def test_engine_fields_with_a_given_engine_are_refused():
    module = tiny()
    callback = RolloutEngineCallback(HFEngine(module.actor, pad_token_id=0))
    with pytest.raises(ValueError, match=r"StrategyConfig.engine_type='vllm' would be ignored: an engine was given "
                                         r"\(HFEngine\)"):
        callback.on_fit_start(_trainer({"engine_type": "vllm"}), module)


# ---------------------------------------------------------------------------- rollout batch sizes
def test_micro_rollout_batch_size_splits_the_scoring_forwards():
    sizes = {}
    for micro in (None, 2):
        pl.seed_everything(0, verbose=False)
        model = tiny(epochs=2, kl_coef=0.1, micro_rollout_batch_size=micro)  # scores old and reference log-probs
        seen: list[int] = []
        model.ref.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs["input_ids"].shape[0]),
                                        with_kwargs=True)
        trainer, _ = fit(model, 2)
        sizes[micro] = seen
        assert trainer.strategy.config.micro_rollout_batch_size == (micro or 4)
        assert trainer.strategy.config.rollout_batch_size == 4  # prompts per step x 1 rank
    # 8 samples per step, 2 per prompt: each scoring forward packs its samples into one row per prompt
    assert sizes == {None: [2, 2] * 2, 2: [1, 1, 1, 1] * 2}
    with pytest.raises(ValueError, match=r"GRPO.micro_rollout_batch_size=0 is invalid; accepted: None or an integer"):
        tiny(micro_rollout_batch_size=0)


def test_rollout_batch_size_from_the_config_without_a_datamodule():
    def loader():
        return DataLoader(PromptDataset(counting_prompts(16, seed=1)), batch_size=4, collate_fn=collate_prompts)

    with pytest.raises(ValueError, match=r"this step has 4 prompts x 1 ranks, but "
                                         r"StrategyConfig.rollout_batch_size=128"):
        fit(tiny(), 1, data=loader())
    model = tiny(lr_scheduler="cosine")
    trainer, lrs = fit(model, 3, config={"rollout_batch_size": 4}, data=loader())
    assert model.num_optimizer_steps() == 3 * 2 and len(lrs.lrs[0]) == 6
    assert lrs.lrs[0][-1] == pytest.approx(closed_form(5, 6, 0, cosine=True))

"""LoRA GRPO/PPO: only adapters train, the reference is the base with adapters off, the engine gets
exactly the merged weights, exports round-trip; on a tiny tied model and on the real model."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from transformers import AutoModelForCausalLM

from lightrft_lightning import LightRFTFake, pretrained
from lightrft_lightning.algorithms import GRPO, PPO
from lightrft_lightning.callbacks import RolloutEngineCallback
from lightrft_lightning.data import PromptDataModule
from lightrft_lightning.lora import adapters_disabled, lora_layers
from lightrft_lightning.tasks import arithmetic_problems, counting_prompts

pytest.importorskip("peft")
torch.set_num_threads(1)

TIED = {"hidden_size": 64, "intermediate_size": 128, "tie_word_embeddings": True}
LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]}


def merged_copy(actor: torch.nn.Module) -> torch.nn.Module:
    """The actor with peft's own in-place merge applied to a copy (the adapted actor's function)."""
    merged = copy.deepcopy(actor).eval()
    for _, layer in lora_layers(merged):
        layer.merge()
    return merged


class EngineCheck(Callback):
    """After each step: the engine's weights against peft's merge of the actor, and greedy completions
    of the engine against the merged actor's (``generate``), on ``prompts``."""

    def __init__(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        self.prompts, self.max_new_tokens = prompts, max_new_tokens
        self.weight_diffs: list[float] = []
        self.matched: list[tuple[int, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from lightrft_lightning.engines.base import SamplingParams

        callback = next(cb for cb in trainer.callbacks if isinstance(cb, RolloutEngineCallback))
        params = SamplingParams(n=1, temperature=0.0, max_new_tokens=self.max_new_tokens)
        completions = callback.generate(pl_module, self.prompts, params)  # pushes the stepped weights
        merged = merged_copy(pl_module.actor)
        engine_state = dict(callback.engine.model.named_parameters())
        base = {name.replace(".base_layer", ""): p for name, p in merged.named_parameters() if ".lora_" not in name}
        assert base.keys() == engine_state.keys()
        self.weight_diffs.append(max((engine_state[name] - p).abs().max().item() for name, p in base.items()))
        same = 0
        for prompt, completion in zip(self.prompts, completions):
            ids = torch.tensor([prompt])
            out = merged.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=self.max_new_tokens, pad_token_id=pl_module.tokenizer.pad_token_id,
                                  eos_token_id=pl_module.tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
            eos = pl_module.tokenizer.eos_token_id
            out = out[: out.index(eos) + 1] if eos in out else out
            same += out == list(completion.token_ids)
        self.matched.append((same, len(self.prompts)))


def fit(module, data, steps: int, callbacks=()) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", strategy=LightRFTFake(), max_steps=steps, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0, limit_val_batches=0, callbacks=list(callbacks))
    trainer.fit(module, data)
    return trainer


def tiny(cls=GRPO, **kwargs):
    defaults = dict(tokenizer_chars="0123456789", model_config=TIED, n_samples_per_prompt=4, max_new_tokens=4,
                    micro_train_batch_size=16, actor_learning_rate=1e-2, kl_coef=0.1, lora=LORA)
    return cls(**{**defaults, **kwargs})


@pytest.mark.parametrize("lora, field", [
    ({"r": 0}, "lora.r"), ({"r": 4, "rank": 2}, "unknown keys"), ({"r": 4, "alpha": -1}, "lora.alpha"),
    ({"r": 4, "dropout": 1.5}, "lora.dropout"), ({"r": 4, "target_modules": ["nope"]}, "lora.target_modules"),
    ({"r": 4, "target_modules": ["lm_head"]}, "tied embedding"), ([4], r"lora=\[4\] is invalid"),
])
def test_bad_lora_settings_name_the_field(lora, field):
    with pytest.raises(ValueError, match=field):
        tiny(lora=lora)


def test_only_adapters_train_and_the_reference_is_the_base_and_the_engine_gets_the_merge():
    pl.seed_everything(0, verbose=False)
    module = tiny()
    before = {n: p.detach().clone() for n, p in module.actor.named_parameters()}
    base = copy.deepcopy(module.actor)
    assert module.ref is None  # no second copy of the weights
    check = EngineCheck([[1, 2, 3], [4, 5]], max_new_tokens=4)
    trainer = fit(module, PromptDataModule(prompts=counting_prompts(64, seed=0), batch_size=4), 2, [check])
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    for name, p in module.actor.named_parameters():
        adapter = ".lora_" in name
        assert (id(p) in optimized) == adapter == p.requires_grad, name
        if adapter and ".lora_B." in name:
            assert not torch.equal(p, before[name]), f"{name} did not train"
        elif not adapter:
            assert torch.equal(p, before[name]), f"{name} (base) changed"
    assert module.actor.lm_head.weight is module.actor.model.embed_tokens.weight
    assert check.weight_diffs == [0.0, 0.0]  # exactly peft's merge of the trained actor
    assert all(same == total for same, total in check.matched), check.matched
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad(), adapters_disabled(module.actor):
        off = module.actor.eval()(input_ids=ids).logits
    assert torch.equal(off, base.eval()(input_ids=ids).logits)  # the KL reference: the untouched base
    assert not torch.equal(module.actor(input_ids=ids).logits, off)


def test_ppo_critic_trains_its_own_adapters_and_value_head():
    pl.seed_everything(0, verbose=False)
    module = tiny(PPO, n_samples_per_prompt=2, micro_train_batch_size=8, critic_learning_rate=1e-2)
    before = {n: p.detach().clone() for n, p in module.critic.named_parameters()}
    # 2 steps: the zero-initialized value head passes no gradient to the backbone in the first
    fit(module, PromptDataModule(prompts=counting_prompts(32, seed=0), batch_size=4), 2)
    for name, p in module.critic.named_parameters():
        trained = ".lora_B." in name or name.startswith("value_head")
        assert p.requires_grad == (".lora_" in name or name.startswith("value_head")), name
        assert torch.equal(p, before[name]) != trained, name


def test_export_writes_the_adapter_and_a_merged_model_that_compute_like_the_actor(tmp_path):
    from peft import PeftModel

    pl.seed_everything(0, verbose=False)
    module = tiny()
    fit(module, PromptDataModule(prompts=counting_prompts(32, seed=0), batch_size=4), 1)
    strategy, actor = LightRFTFake(), module.actor.eval()
    strategy.save_model(actor, module.tokenizer, str(tmp_path / "adapter"))
    strategy.save_merged_model(actor, None, str(tmp_path / "merged"))
    assert sorted(p.name for p in (tmp_path / "adapter").glob("adapter_*")) == ["adapter_config.json",
                                                                                 "adapter_model.safetensors"]
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        want = actor(input_ids=ids).logits
        base = tiny(lora=None).actor  # the same seed-0 base, rebuilt
        adapted = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
        assert torch.allclose(adapted(input_ids=ids).logits, want, atol=1e-6)
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
        assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
        assert torch.allclose(merged(input_ids=ids).logits, want, atol=1e-5)
        assert torch.equal(merged(input_ids=ids).logits, merged_copy(actor)(input_ids=ids).logits)


def test_lora_grpo_on_the_real_model_syncs_merged_weights_to_the_engine():
    pl.seed_everything(0, verbose=False)
    module = GRPO(model="smollm2-135m-instruct", apply_chat_template=True, n_samples_per_prompt=2, max_new_tokens=8,
                  micro_train_batch_size=4, actor_learning_rate=1e-3, kl_coef=0.05, temperature=1.0,
                  rewards={"lightrft_lightning.tasks:arithmetic_reward": 1.0}, lora={"r": 8, "alpha": 16})
    from lightrft_lightning.data import render_prompts

    _, prompts = render_prompts(arithmetic_problems(2, seed=5), module.tokenizer, True)
    check = EngineCheck(prompts, max_new_tokens=8)
    base_embed = module.actor.model.embed_tokens.weight.detach().clone()
    fit(module, PromptDataModule(prompts=arithmetic_problems(4, seed=0), batch_size=2), 1, [check])
    assert check.weight_diffs == [0.0] and check.matched == [(2, 2)]
    assert torch.equal(module.actor.model.embed_tokens.weight, base_embed)
    assert module.actor.lm_head.weight is module.actor.model.embed_tokens.weight
    trainable = sum(p.numel() for p in module.actor.parameters() if p.requires_grad)
    assert 0 < trainable < 0.05 * sum(p.numel() for p in module.actor.parameters())
    assert pretrained.resolve("smollm2-135m-instruct") == module.actor.config.name_or_path


def test_checkpoint_holds_the_adapters_and_resumes_exactly(tmp_path):
    """Greedy rollouts: 3 straight steps against 1 step, an adapters-only checkpoint, a fresh module
    resumed for 2 more (losses and every weight equal); the checkpoint is a fraction of a full one's."""
    data = lambda: PromptDataModule(prompts=counting_prompts(64, seed=0), batch_size=4)  # noqa: E731

    def run(steps, ckpt_path=None, save=None, **kwargs):
        pl.seed_everything(0, verbose=False)
        module = tiny(temperature=0.0, **kwargs)
        rec = Losses()
        trainer = pl.Trainer(accelerator="cpu", strategy=LightRFTFake(), max_steps=steps, logger=False,
                             enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                             num_sanity_val_steps=0, limit_val_batches=0, callbacks=[rec])
        trainer.fit(module, data(), ckpt_path=ckpt_path)
        if save:
            trainer.save_checkpoint(save)
        return module, rec.losses

    straight, losses = run(3)
    run(1, save=tmp_path / "lora.ckpt")
    resumed, tail = run(3, ckpt_path=tmp_path / "lora.ckpt")
    assert tail == losses[1:]
    for (name, a), b in zip(straight.actor.named_parameters(), resumed.actor.parameters()):
        assert torch.equal(a, b), name
    stored = torch.load(tmp_path / "lora.ckpt", weights_only=True)["state_dict"]
    assert stored and all(".lora_" in k for k in stored), sorted(stored)[:4]
    run(1, save=tmp_path / "full.ckpt", lora=None)
    assert (tmp_path / "lora.ckpt").stat().st_size < 0.5 * (tmp_path / "full.ckpt").stat().st_size


class Losses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.callback_metrics["loss/policy"]))


def test_a_peft_model_from_lightrft_style_code_exports_its_adapter_and_merged_weights(tmp_path):
    """LightRFT's actors wrap the model with ``peft.get_peft_model``: ``save_model`` writes the adapter
    (as LightRFT does), ``save_merged_model`` a plain tied model; both compute like the actor."""
    import peft

    from lightrft_lightning import FakeStrategy
    from lightrft_lightning.tiny_models import tiny_causal_lm

    model = peft.get_peft_model(tiny_causal_lm(tie_word_embeddings=True),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a trained adapter
    strategy = FakeStrategy(seed=0, micro_train_batch_size=1, train_batch_size=1)
    strategy.save_model(model, None, str(tmp_path / "adapter"))
    strategy.save_merged_model(model, None, str(tmp_path / "merged"))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        want = model.eval()(input_ids=ids).logits
        loaded = peft.PeftModel.from_pretrained(tiny_causal_lm(tie_word_embeddings=True), str(tmp_path / "adapter"))
        assert torch.allclose(loaded.eval()(input_ids=ids).logits, want, atol=1e-6)
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
        assert torch.allclose(merged(input_ids=ids).logits, want, atol=1e-5)
        assert not torch.allclose(tiny_causal_lm(tie_word_embeddings=True)(input_ids=ids).logits, want, atol=1e-3)

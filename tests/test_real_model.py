"""The real pretrained model, SmolLM2-135M-Instruct (tied embeddings, chat template), fetched by its
built-in name: the engine follows the actor with equal logits after a weight sync, an export reloads
tied with equal logits, and a GRPO step trains it on a chat-rendered arithmetic task."""

from __future__ import annotations

import os
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightrft_lightning import LightRFTFake, pretrained
from lightrft_lightning.algorithms import GRPO
from lightrft_lightning.data import PromptDataModule, render_prompts
from lightrft_lightning.engines.hf import HFEngine
from lightrft_lightning.engines.weight_sync import push_weights
from lightrft_lightning.tasks import arithmetic_problems
from lightrft_lightning.tiny_models import tiny_causal_lm
from tests.launch import SCRIPTS, script_env, script_result, torchrun

NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def model_dir() -> str:
    return pretrained.resolve(NAME)


@pytest.fixture(scope="module")
def actor(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt_ids(model_dir) -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(model_dir)
    _, ids = render_prompts([{"prompt": "What is 12 + 7?"}], tok, apply_chat_template=True)
    return torch.tensor(ids)


def test_builtin_name_resolves_to_a_cached_tied_model(model_dir, actor):
    weights = os.path.join(model_dir, "model.safetensors")
    mtime = os.path.getmtime(weights)
    assert pretrained.resolve(NAME) == model_dir and os.path.getmtime(weights) == mtime  # converted once
    assert actor.config.tie_word_embeddings
    assert actor.lm_head.weight is actor.model.embed_tokens.weight
    assert sum(p.numel() for p in actor.parameters()) == 134_515_008


@pytest.mark.parametrize("which", ["tiny-tied", "smollm2"])
def test_engine_from_config_is_tied_and_follows_the_actor(which, actor, prompt_ids):
    model = tiny_causal_lm(seed=0, tie_word_embeddings=True).eval() if which == "tiny-tied" else actor
    ids = prompt_ids.clamp(max=model.config.vocab_size - 1)
    engine = HFEngine.from_config(model.config, dtype=torch.float32, pad_token_id=0)
    assert engine.model.lm_head.weight is engine.model.model.embed_tokens.weight
    push_weights(model, engine, bucket_bytes=64 << 20)  # named_parameters: the tied tensor goes once
    assert engine.weights_valid
    with torch.no_grad():
        diff = (engine.model(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()
    assert diff == 0.0


def test_export_stays_tied_and_reloads_with_equal_logits(tmp_path, actor, prompt_ids):
    strategy = LightRFTFake()
    strategy.save_model(actor, None, str(tmp_path))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    with torch.no_grad():
        diff = (reloaded(input_ids=prompt_ids).logits - actor(input_ids=prompt_ids).logits).abs().max().item()
    assert diff == 0.0


def digit_share(prompts, completions, metadata):
    """A dense reward, so that six-token samples of the same prompt differ (a tied group teaches nothing)."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def test_grpo_step_on_the_real_model_with_chat_prompts(tmp_path):
    pl.seed_everything(0, verbose=False)
    rewards = {"lightrft_lightning.tasks:arithmetic_reward": 1.0, "tests.test_real_model:digit_share": 0.5}
    model = GRPO(model=NAME, apply_chat_template=True, rewards=rewards,
                 n_samples_per_prompt=4, max_new_tokens=6, micro_train_batch_size=8, actor_learning_rate=1e-5,
                 sample_every_n_steps=1)
    before = model.actor.model.embed_tokens.weight.detach().clone()
    data = PromptDataModule(prompts=arithmetic_problems(8, seed=3), batch_size=2)
    logger = pl.loggers.CSVLogger(str(tmp_path), name="", version="")
    trainer = pl.Trainer(accelerator="cpu", strategy=LightRFTFake(), max_steps=1, logger=logger, log_every_n_steps=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["loss/policy"]) and 0 <= metrics["reward/arithmetic_reward"] <= 1
    assert 0 <= metrics["groups/all_tied"] < 1 and 0 <= metrics["response/truncated"] <= 1
    assert 0 <= metrics["reward/digit_share"] <= 1
    moved = (model.actor.model.embed_tokens.weight - before).abs().max().item()
    assert moved > 0 and model.actor.lm_head.weight is model.actor.model.embed_tokens.weight  # still tied
    samples = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert samples and "<|im_start|>assistant" in samples[0]  # the rendered chat prompt


def test_gguf_cli_names_a_missing_file(tmp_path, capsys):
    from lightrft_lightning.convert import main

    assert main(["gguf-to-hf", str(tmp_path / "missing.gguf"), str(tmp_path / "out")]) == 1
    assert "missing.gguf' does not exist; accepted: a .gguf file" in capsys.readouterr().err


@pytest.mark.multiprocess
def test_grpo_step_on_2_fsdp_ranks_matches_one_process_and_stays_tied(tmp_path, model_dir):
    one = subprocess.run([sys.executable, str(SCRIPTS / "real_model_grpo.py"), "lightrft_fake", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env=script_env())
    assert one.returncode == 0, one.stderr[-4000:]
    single = script_result(one)
    fsdp = script_result(torchrun("real_model_grpo.py", 2, "lightrft_fsdp", str(tmp_path), timeout=600))
    print({"fake": single, "fsdp": fsdp})
    for run in (single, fsdp):
        assert run["engine_tied"] and run["export_tied"], run
        assert run["engine_diff"] <= 1e-5 and run["export_diff"] <= 1e-5, run
    assert single["grad_norm"] > 0
    for key in ("loss", "grad_norm", "reward"):
        assert fsdp[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), key


def test_converting_on_first_use_leaves_the_seeded_rng_alone(tmp_path, monkeypatch):
    # building the model during a conversion draws init weights; a run seeded before it must draw what
    # a run with the model already cached draws
    from lightrft_lightning import convert

    def fake_convert(gguf: str, out: str) -> str:
        torch.rand(1000)
        os.makedirs(out)
        open(os.path.join(out, "config.json"), "w").write("{}")
        return out

    monkeypatch.setenv("LIGHTRFT_CACHE", str(tmp_path))
    monkeypatch.setattr(convert, "gguf_to_hf", fake_convert)
    torch.manual_seed(0)
    pretrained.resolve(NAME)  # converts
    first = torch.rand(3)
    torch.manual_seed(0)
    pretrained.resolve(NAME)  # cached
    assert torch.equal(torch.rand(3), first)

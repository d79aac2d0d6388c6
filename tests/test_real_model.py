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
from safetensors.torch import load_file
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
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()  # written once
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
    before = load_file(f"{pretrained.resolve(NAME)}/model.safetensors")["model.embed_tokens.weight"]  # the actor is on meta
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


@pytest.fixture(scope="module")
def one_process_step(tmp_path_factory) -> tuple[dict, str]:
    out = str(tmp_path_factory.mktemp("real-fake"))
    run = subprocess.run([sys.executable, str(SCRIPTS / "real_model_grpo.py"), "lightrft_fake", out],
                         capture_output=True, text=True, timeout=600, env=script_env())
    assert run.returncode == 0, run.stderr[-4000:]
    return script_result(run), out


@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", ["lightrft_fsdp", "lightrft_deepspeed_stage_3"])
def test_grpo_step_on_2_ranks_matches_one_process_and_stays_tied(tmp_path, model_dir, one_process_step, strategy):
    single, _ = one_process_step
    multi = script_result(torchrun("real_model_grpo.py", 2, strategy, str(tmp_path), timeout=600))
    print({"fake": single, strategy: multi})
    for run in (single, multi):
        assert run["engine_tied"] and run["export_tied"], run
        assert run["engine_diff"] <= 1e-5 and run["export_diff"] <= 1e-5, run
    assert single["grad_norm"] > 0
    for key in ("loss", "grad_norm", "reward"):
        assert multi[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), key
    # the convert CLI on the run's Lightning checkpoint (and, under DeepSpeed, on its per-engine
    # DeepSpeed checkpoint): a tied Hugging Face directory with the exported model's logits
    from lightrft_lightning.convert import main as convert

    ckpt, exported = tmp_path / f"{strategy}-ckpt", tmp_path / f"{strategy}-hf"
    if strategy == "lightrft_fsdp":
        command = ["dcp-to-hf", str(ckpt), str(tmp_path / "converted"), "--config", model_dir]
    else:
        command = ["deepspeed-to-hf", str(ckpt / "actor"), str(tmp_path / "converted"), "--config", model_dir]
    assert convert(command) == 0
    converted = AutoModelForCausalLM.from_pretrained(str(tmp_path / "converted"), dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32).eval()
    assert converted.lm_head.weight is converted.model.embed_tokens.weight
    ids = torch.tensor([[1, 2, 3, 400, 500, 4000]])
    with torch.no_grad():
        assert torch.equal(converted(input_ids=ids).logits, reference(input_ids=ids).logits)


def _fit(max_steps: int, dirpath=None, seed: int = 0) -> tuple[GRPO, list]:
    from lightrft_lightning.callbacks.dcp_checkpoint import DCPCheckpoint
    from tests.scripts.ckpt_common import LossRecorder

    pl.seed_everything(seed, verbose=False)
    model = GRPO(model=NAME, apply_chat_template=True, rewards={"tests.test_real_model:digit_share": 1.0},
                 n_samples_per_prompt=2, max_new_tokens=4, temperature=1.0, micro_train_batch_size=4,
                 actor_learning_rate=1e-5)
    data = PromptDataModule(prompts=arithmetic_problems(8, seed=3), batch_size=2)
    recorder = LossRecorder(key="loss/policy")
    trainer = pl.Trainer(accelerator="cpu", strategy=LightRFTFake(), max_steps=max_steps, logger=False,
                         callbacks=[recorder] + ([DCPCheckpoint(dirpath, every_n_train_steps=1)] if dirpath else []),
                         enable_checkpointing=dirpath is not None, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, data)
    return model, recorder.losses


def test_sampled_grpo_on_the_real_model_resumes_exactly(tmp_path):
    from tests.scripts.ckpt_common import max_diff, params

    straight, straight_losses = _fit(2)
    _fit(1, tmp_path)
    resumed, losses = _fit(2, tmp_path, seed=7)  # other seed: all state from the checkpoint
    assert losses == straight_losses[1:]
    assert max_diff(params(resumed.actor), params(straight.actor)) == 0.0
    assert resumed.actor.lm_head.weight is resumed.actor.model.embed_tokens.weight


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


def test_a_hub_id_resolves_from_the_hub_cache(tmp_path, monkeypatch):
    # no hub is reachable here: a model in the local hub cache (the layout `snapshot_download` writes)
    # is found offline; the unreachable case is a row of tests/test_bad_inputs.py
    import huggingface_hub.constants

    snapshot = tmp_path / "models--org--tiny-tied" / "snapshots" / "abc123"
    tiny_causal_lm(seed=0, tie_word_embeddings=True).save_pretrained(str(snapshot))
    (tmp_path / "models--org--tiny-tied" / "refs").mkdir()
    (tmp_path / "models--org--tiny-tied" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    path = pretrained.resolve("org/tiny-tied")
    assert os.path.samefile(path, snapshot)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def _learner_logprobs(actor, prompt: list[int], completions, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The learner's (``log_probs`` at the sampling temperature, one batched forward) and the engine's
    log-probs of every sampled token (completions of one prompt, all of one length)."""
    from lightrft_lightning.algorithms.log_probs import log_probs

    ids = torch.tensor([prompt + c.token_ids for c in completions])
    with torch.no_grad():
        logp, _ = log_probs(actor, ids, torch.ones_like(ids), temperature)
    return logp[:, len(prompt) - 1:].flatten(), torch.tensor([c.logprobs for c in completions]).flatten()


def test_engine_and_learner_log_probs_mean_the_same_on_the_real_model(actor, prompt_ids):
    """fp32 HF engine at temperature 0.7: its log-probs are the learner's (the same tempered distribution);
    with top-p they are renormalized over the nucleus, so never below the learner's; a bf16 engine under the
    fp32 learner: the mismatch metrics are non-zero and TIS caps the weights."""
    from lightrft_lightning.algorithms.losses import rollout_correction
    from lightrft_lightning.engines import SamplingParams

    prompt = prompt_ids[0].tolist()
    params = SamplingParams(n=2, temperature=0.7, max_new_tokens=8, stop_at_eos=False, seed=0)
    fp32 = HFEngine(actor, pad_token_id=0, share_weights=True)
    learner, engine = _learner_logprobs(actor, prompt, fp32.generate([prompt], params), 0.7)
    gap = (learner - engine).abs()
    print(f"FIGURE hf_fp32_T0.7 mean_abs_diff={gap.mean():.3g} max={gap.max():.3g} tokens={len(gap)}")
    assert gap.max() < 1e-4 and gap.mean() < 1e-5
    nucleus = SamplingParams(**dict(vars(params), top_p=0.8))
    learner, engine = _learner_logprobs(actor, prompt, fp32.generate([prompt], nucleus), 0.7)
    assert (engine - learner).min() > -1e-4 and (engine - learner).max() > 1e-3  # log of the mass top-p kept

    bf16 = HFEngine.from_config(actor.config, dtype=torch.bfloat16, pad_token_id=0)
    push_weights(actor, bf16, bucket_bytes=64 << 20)
    learner, engine = _learner_logprobs(actor, prompt, bf16.generate([prompt], params), 0.7)
    weights, metrics = rollout_correction(learner[None], engine[None], torch.ones(1, len(learner)), is_level="token",
                                          is_threshold=1.01)
    print("FIGURE hf_bf16_T0.7", {k: round(v.item(), 6) for k, v in metrics.items()})
    assert metrics["logp_abs_diff"] > 1e-3 and metrics["kl"] > 1e-6 and metrics["ratio_max"] > 1.01
    assert 0 < metrics["tokens_truncated"] < 1
    assert weights.max() == pytest.approx(1.01) and weights.min() > 0

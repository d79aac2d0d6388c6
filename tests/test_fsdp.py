"""LightRFTFSDP: real FSDP2 on real gloo process groups (the multi-rank checks are scripts under
tests/scripts, launched with torchrun), plus in-process checks of naming and bad input."""

import argparse
import json
import math
import os
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from lightrft_lightning import get_strategy
from lightrft_lightning.strategies.fsdp import LightRFTFSDP
from tests.launch import torchrun

ROOT = str(Path(__file__).resolve().parents[1])


def run(script: str, nproc: int, *args: str, env: dict | None = None) -> dict[str, dict]:
    """Launch a script on ``nproc`` ranks; return its ``TAG {json}`` lines as ``{TAG: dict}``."""
    proc = torchrun(script, nproc, *args, env={"PYTHONPATH": ROOT, **(env or {})}, timeout=240)
    results = {}
    for line in proc.stdout.splitlines():
        tag, _, payload = line.partition(" ")
        if tag.isupper() and payload.startswith("{"):
            results[tag] = json.loads(payload)
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """One 2-rank launch for the standalone checks (process start-up dominates their cost)."""
    root = tmp_path_factory.mktemp("fsdp")
    return root, run("fsdp_checks.py", 2, str(root), "equivalence", "seed", "save")


def test_two_ranks_match_one_process_with_accumulation_and_clipping(two_ranks):
    out = two_ranks[1]["EQUIV"]
    print(f"equivalence: max |loss diff| = {out['max_loss_diff']:.3g}, max |param diff| = {out['max_param_diff']:.3g}")
    assert out["max_param_diff"] <= 1e-5 and out["max_loss_diff"] <= 1e-5
    assert all(norm > out["max_norm"] for norm in out["grad_norms"])  # clipping was active on every step
    assert out["losses"][-1] < out["losses"][0]


@pytest.mark.parametrize("world", [1, 4])
def test_checkpoint_saved_on_2_ranks_loads_on_1_and_4(two_ranks, world):
    root, results = two_ranks
    assert results["SAVE"]["world"] == 2 and (root / "ckpt" / "latest").read_text() == "global_step2"
    assert len(list((root / "ckpt" / "global_step2").glob("*.distcp"))) == 2
    out = run("fsdp_checks.py", world, str(root), "load")["LOAD"]
    print(f"resharding 2->{world}: {out}")
    assert out["world"] == world and out["tag"] == "global_step2" and out["steps"] == 2 + 1
    assert out["client_state"] == {"consumed_samples": 16} and out["sched_last_epoch"] == 3
    assert out["optim_entries"][0] == out["optim_entries"][1] > 0
    assert out["max_params_diff"] == 0 and out["max_optim_diff"] == 0 and out["max_after_diff"] <= 1e-5


def test_seed_snippets_multi_model_prepare_skip_and_hsdp(two_ranks):
    out = two_ranks[1]["SEED"]
    assert out["stepped"] == [True, True, False, False] and out["skipped_steps"] == 2
    assert 0 < out["actor_changed"] < math.inf and out["full_state_dict_matches"] and out["reward_finite"]
    assert out["all_reduce_mean"] == 0.5 and out["all_reduce_max"] == 2.0 and out["all_gather"] == [0, 1]
    assert out["hsdp_placements"] == ["R", "S(0)"] and out["hsdp_mesh"] == [2, 1] and out["hsdp_replicas_equal"] == 0


def test_trainer_fits_actor_critic_checkpoints_and_resumes(tmp_path):
    out = run("fsdp_trainer.py", 2, str(tmp_path))["TRAINER"]
    for run_info in (out["a"], out["b"]):
        assert run_info["global_step"] == 4  # training steps, not actor + critic optimizer steps
        assert run_info["optimizer_steps"] == {"actor": 2, "critic": 2}  # 2 micro-steps per optimizer step
        assert run_info["lr"] == pytest.approx([1e-3 / 4, 5e-3 / 4])
        assert {"actor/grad_norm", "critic/skipped_steps", "actor_loss"} <= set(run_info["metrics"])
    assert out["ckpts"] == ["epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt"]
    assert (tmp_path / "a" / "ckpts" / "epoch=0-step=2.ckpt" / ".metadata").is_file()
    assert out["resume_max_diff"] <= 1e-6
    assert out["c"]["global_step"] == 2 and out["c"]["optimizer_steps"] == {"actor": 1, "critic": 1}


def test_registered_names_and_precision_mapping():
    args = argparse.Namespace(fsdp=True)
    assert isinstance(get_strategy(args), LightRFTFSDP)
    trainer = Trainer(accelerator="cpu", devices=2, strategy="lightrft_fsdp", precision="bf16-mixed", logger=False)
    assert isinstance(trainer.strategy, LightRFTFSDP)
    policy = trainer.strategy.mp_policy
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    trainer = Trainer(accelerator="cpu", devices=1, strategy="lightrft_fsdp", precision="bf16-true", logger=False)
    assert (trainer.strategy.mp_policy.param_dtype, trainer.strategy.mp_policy.reduce_dtype) == (None, torch.float32)
    assert LightRFTFSDP({"bf16": False}).mp_policy.param_dtype is None  # standalone: the config decides


def test_blocks_to_shard_come_from_no_split_modules_or_wrap_classes():
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2MLP

    from lightrft_lightning.parallel.fsdp2 import block_classes
    from lightrft_lightning.tiny_models import tiny_causal_lm

    model = tiny_causal_lm()
    assert block_classes(model, [], "LightRFTFSDP") == (Qwen2DecoderLayer,)
    assert block_classes(model, ["Qwen2MLP"], "LightRFTFSDP") == (Qwen2MLP,)
    assert block_classes(model, [Qwen2MLP], "LightRFTFSDP") == (Qwen2MLP,)
    with pytest.raises(ValueError, match=r"wrap_classes=\['Block'\] match no module of Qwen2ForCausalLM"):
        block_classes(model, ["Block"], "LightRFTFSDP")
    with pytest.raises(RuntimeError, match=r"call setup_distributed\(\) before prepare\(\)"):
        LightRFTFSDP().prepare(model)


def test_bad_input_is_refused_before_any_process_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"shard_size=3 .*divisor of the world size"):
        LightRFTFSDP({"fsdp": True, "shard_size": 3}).setup_distributed()
    assert not torch.distributed.is_initialized()
    trainer = Trainer(accelerator="cpu", devices=1, strategy="lightrft_fsdp", precision="64-true", logger=False)
    with pytest.raises(ValueError, match=r"precision='64-true' is not supported; accepted: '32-true'"):
        trainer.strategy.mp_policy
    with pytest.raises(ValueError, match="shard_size"):
        LightRFTFSDP({"fsdp": True, "shard_size": 0})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_on_nccl_gpu():
    gpus = min(torch.cuda.device_count(), 2)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(gpus))))
    out = run("fsdp_gpu.py", gpus, env={"CUDA_VISIBLE_DEVICES": visible})["GPU"]
    assert out["backend"] == "nccl" and out["param_dtype"] == "torch.bfloat16"
    assert out["master_dtype"] == "torch.float32" and out["logits_dtype"] == "torch.bfloat16"
    assert out["loss_last"] < out["loss_first"] and out["max_param_diff"] == 0
    assert out["offload_param_device"] == "cpu"

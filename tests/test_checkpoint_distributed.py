"""Checkpoints on 2 gloo ranks, each rank its own process: exact resume with DCPCheckpoint under
LightRFTFSDP and LightRFTDeepSpeed (a manual-optimization module, and GRPO with sampling), SIGKILL
of a rank during a save (the previous checkpoint loads and the run resumes exactly), and a peer
that dies mid-training (the survivor fails within the configured timeout instead of hanging)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightrft_lightning import checkpoint
from tests.launch import SCRIPTS, free_port, torchrun


def run(strategy: str, root, phase: str = "all", kill: str = "", check: bool = True, asynchronous: bool = False):
    env = {"KILL": kill, "ASYNC": "1" if asynchronous else ""}
    proc = torchrun("ckpt_resume.py", 2, strategy, str(root), phase, timeout=420, check=check, env=env)
    found = re.search(r"^RESUME (.*)$", proc.stdout, re.M)
    return proc, (json.loads(found.group(1)) if found else None)


@pytest.fixture(scope="module")
def fsdp_straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    _, out = run("fsdp", root, "all")
    return root, out


def test_fsdp_exact_resume(fsdp_straight):
    _, out = fsdp_straight
    assert out["first"] == out["straight"][:2]
    assert out["resumed_from"] == "global_step2"
    assert out["resumed"] == out["straight"][2:]
    assert out["max_param_diff"] == 0.0


def test_fsdp_exact_resume_with_async_save(tmp_path):
    _, out = run("fsdp", tmp_path, "all", asynchronous=True)
    assert out["resumed_from"] == "global_step2"
    assert out["resumed"] == out["straight"][2:]
    assert out["max_param_diff"] == 0.0


def test_deepspeed_exact_resume(tmp_path):
    _, out = run("deepspeed", tmp_path, "all")
    assert out["resumed_from"] == "global_step2"
    assert out["resumed"] == out["straight"][2:]
    assert out["max_param_diff"] == 0.0


@pytest.mark.parametrize("point", ["write", "publish"])
def test_sigkill_during_save_keeps_the_previous_checkpoint(fsdp_straight, tmp_path, point):
    straight_root, straight = fsdp_straight
    shutil.copy(straight_root / "straight.pt", tmp_path / "straight.pt")
    proc, _ = run("fsdp", tmp_path, "first", kill=point, check=False)
    assert proc.returncode != 0  # rank 1 died during the save of step 4
    assert checkpoint.read_latest(tmp_path / "b") == "global_step2"
    assert not (tmp_path / "b" / "global_step4").exists()
    _, out = run("fsdp", tmp_path, "resume")
    assert out["resumed_from"] == "global_step2"  # the previous checkpoint loads
    assert out["resumed"] == straight["straight"][2:] and out["max_param_diff"] == 0.0


def test_peer_death_fails_within_the_timeout():
    timeout_minutes = 0.25
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}
        procs.append(subprocess.Popen([sys.executable, str(SCRIPTS / "ckpt_peer_death.py"), str(timeout_minutes)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out, err = procs[0].communicate(timeout=300)
    procs[1].wait(timeout=60)
    ended = time.time()
    assert procs[1].returncode == -9
    assert procs[0].returncode != 0 and "finished without noticing" not in out
    died_at = float(re.search(r"PEER_DEATH rank0 step1 at (\S+)", out).group(1))
    assert ended - died_at < timeout_minutes * 60 + 30  # the configured timeout, plus process teardown
    assert re.search(r"Timed out|Connection closed by peer|Connection reset by peer", err), err[-2000:]


# LoRA runs: their checkpoints take the adapters-only paths (FSDP's load template without the frozen
# base, DeepSpeed's exclude_frozen_parameters); full-weight resumes of both backends are
# test_fsdp_exact_resume and test_deepspeed_exact_resume, sampled GRPO's RNG state is the same here
@pytest.mark.parametrize("strategy, lora", [("fsdp", True), ("deepspeed", True)], ids=["fsdp-lora", "deepspeed-lora"])
def test_grpo_with_sampling_resumes_exactly(strategy, lora, tmp_path):
    out = torchrun("ckpt_grpo.py", 2, strategy, str(tmp_path), *(["lora"] if lora else []), timeout=420).stdout
    result = json.loads(re.search(r"^GRPO_RESUME (.*)$", out, re.M).group(1))
    assert result["resumed_from"] == "global_step2"
    # a LoRA checkpoint holds the adapters, not the frozen base
    assert result["stored_keys"] and all(".lora_" in k for k in result["stored_keys"]) == lora
    if lora:
        check_lora_exports(tmp_path / "a")
    assert result["resumed_rewards"] == result["straight_rewards"][2:]
    assert result["resumed_losses"] == result["straight_losses"][2:]
    assert result["max_param_diff"] == 0.0


def check_lora_exports(root: Path) -> None:
    """The adapter a 2-rank run exported, on the rebuilt base, computes what its merged export does."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lightrft_lightning.tiny_models import tiny_causal_lm

    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    base = tiny_causal_lm(vocab_size=13, hidden_size=32, tie_word_embeddings=True).eval()
    with torch.no_grad():
        before = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, str(root / "adapter")).eval()(input_ids=ids).logits
        merged_model = AutoModelForCausalLM.from_pretrained(str(root / "merged"), dtype=torch.float32).eval()
        merged = merged_model(input_ids=ids).logits
    assert merged_model.lm_head.weight.data_ptr() == merged_model.model.embed_tokens.weight.data_ptr()
    assert torch.allclose(adapted, merged, atol=1e-5) and not torch.allclose(adapted, before, atol=1e-3)

"""``StrategyConfig.gradient_checkpointing`` works on every strategy: the same loss, gradient norm and
stepped weights as without it (fp32), and fewer bytes saved for backward."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lightrft_lightning import LightRFTFake, StrategyConfig
from tests.launch import SCRIPTS, script_env, script_result, torchrun


def check(summary: dict) -> None:
    for spec, runs in summary.items():
        plain, ckpt = runs["False"], runs["True"]
        print(f"{spec}: saved for backward {plain['saved_bytes']} -> {ckpt['saved_bytes']} bytes")
        assert abs(plain["loss"] - ckpt["loss"]) <= 1e-6, spec
        assert abs(plain["grad_norm"] - ckpt["grad_norm"]) <= 1e-6, spec
        assert abs(plain["probe"] - ckpt["probe"]) <= 1e-5, spec
        assert ckpt["saved_bytes"] < plain["saved_bytes"] / 2, spec


def test_fake_strategy():
    proc = subprocess.run([sys.executable, str(SCRIPTS / "grad_ckpt.py"), "fake"], capture_output=True, text=True,
                          timeout=120, env=script_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    check(script_result(proc))


@pytest.mark.multiprocess
def test_fsdp_and_deepspeed_on_2_ranks():
    check(script_result(torchrun("grad_ckpt.py", 2, "fsdp", "deepspeed:2", "deepspeed:3", timeout=300)))


def test_a_model_that_cannot_checkpoint_is_refused():
    from torch import nn

    strategy = LightRFTFake(StrategyConfig(gradient_checkpointing=True))
    with pytest.raises(ValueError, match="StrategyConfig.gradient_checkpointing=True.*accepted"):
        strategy.prepare((nn.Linear(2, 2), None, None))

"""``precision="bf16-mixed"`` trains under all three strategies as fp32 does: fp32 master weights, a
bf16 rollout engine, the first step's loss and gradient norm within bf16 rounding of fp32's, and the
reward rising over the next steps as it does in fp32 (greedy GRPO on the tiny counting model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import script_env, torchrun

ROOT = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import grpo_strategies  # noqa: E402  (also the 2-rank script)

STEPS = 5
BF16 = ("--trainer.precision=bf16-mixed",)


@pytest.fixture(scope="module")
def fp32_steps(monkeypatch_module) -> list[dict[str, float]]:
    return grpo_strategies.run("examples/grpo_tiny_fake.yaml", steps=STEPS).steps


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        yield mp


def check_trains_like_fp32(bf16: list[dict[str, float]], fp32: list[dict[str, float]]) -> None:
    assert len(bf16) == len(fp32) == STEPS
    for key in ("loss/policy", "actor/grad_norm", "reward"):  # the same rollouts, bf16 matmuls
        assert bf16[0][key] == pytest.approx(fp32[0][key], rel=3e-2), key
    first = fp32[0]["reward"]
    later = {name: sum(s["reward"] for s in run[1:]) / (STEPS - 1) for name, run in (("bf16", bf16), ("fp32", fp32))}
    print({"first_reward": first, "mean_reward_after": later})
    assert later["fp32"] > first + 0.1 and later["bf16"] > first + 0.1  # both learn
    assert later["bf16"] == pytest.approx(later["fp32"], abs=0.1)


def test_bf16_mixed_on_the_fake_strategy_trains_like_fp32(fp32_steps, monkeypatch_module):
    run = grpo_strategies.run("examples/grpo_tiny_fake.yaml", steps=STEPS, extra=BF16)
    assert run.dtypes == {"actor": "{torch.float32}", "master": "{torch.float32}", "engine": "torch.bfloat16"}
    check_trains_like_fp32(run.steps, fp32_steps)


@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_bf16_mixed_on_2_ranks_trains_like_fp32(strategy, fp32_steps, tmp_path, monkeypatch_module):
    out = tmp_path / "steps.json"
    config = f"examples/grpo_tiny_{strategy}.yaml"
    # the DeepSpeed example's config says bf16: false, which a bf16 Trainer refuses; LightRFT's keyword wins
    extra = BF16 + (("--trainer.strategy.init_args.bf16=true",) if strategy == "deepspeed" else ())
    torchrun("grpo_strategies.py", 2, config, str(out), str(STEPS), *extra, env={"PYTHONPATH": ROOT}, timeout=300)
    run = json.loads(out.read_text())
    # FSDP2 keeps fp32 parameters and computes in bf16 (MixedPrecisionPolicy); DeepSpeed's bf16 engine
    # holds bf16 parameters and its optimizer the fp32 master copy
    actor = "{torch.float32}" if strategy == "fsdp" else "{torch.bfloat16}"
    assert run["dtypes"] == {"actor": actor, "master": "{torch.float32}", "engine": "torch.bfloat16"}
    check_trains_like_fp32(run["steps"], fp32_steps)


def test_a_deepspeed_config_that_disagrees_with_the_trainer_precision_is_refused(tmp_path, monkeypatch_module):
    # examples/grpo_tiny_deepspeed.yaml says bf16: false; training it in bf16 must not silently stay fp32
    run = subprocess.run([sys.executable, str(Path(ROOT, "tests/scripts/grpo_strategies.py")),
                          "examples/grpo_tiny_deepspeed.yaml", str(tmp_path / "out.json"), "1", *BF16],
                         capture_output=True, text=True, timeout=300, env=script_env())
    assert run.returncode != 0
    assert ("Trainer(precision='bf16-mixed') trains in bf16, but the strategy's config says fp32 "
            "(StrategyConfig.bf16=False, fp16=False); accepted: the same precision in both") in run.stderr
    assert not (tmp_path / "out.json").exists()

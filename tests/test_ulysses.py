"""Ulysses sequence parallelism (``parallel/ulysses.py``) on 2 gloo ranks against one process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from tests.launch import script_result, torchrun

ROOT = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import grpo_strategies  # noqa: E402  (also the 2-rank script)

TOL = 1e-5


def test_ulysses_forward_backward_equals_one_process():
    """Tiny Llama and Qwen2 (padding, a length the shards must pad, heads that do not split evenly, eager
    attention): logits, loss, gradients, and ``log_probs`` (packed and not) with entropies and gradients;
    ``sp_data_processor``'s gather and split on the group."""
    result = script_result(torchrun("ulysses_equivalence.py", 2, timeout=300))
    assert len(result) == 29, result
    for key, value in result.items():
        assert value <= TOL, (key, value)


def test_sp_data_processor_round_trip():
    from lightrft_lightning.parallel.ulysses import SequenceParallelData

    one = SequenceParallelData()
    assert one.preprocess([1, 2]) == [1, 2] and one.postprocess([1, 2]) == [1, 2]


_FSDP_SP2 = ("--trainer.strategy=lightrft_lightning.strategies.fsdp.LightRFTFSDP",
             '--trainer.strategy.init_args.config={"sp_size": 2}')
_GAE = ("--model.init_args.advantage_estimator=gae",)
_SP_RUNS = {  # name: (YAML, ranks, CLI arguments that set sp_size=2, the one-process YAML and arguments)
    "grpo-fsdp2-sp2": ("examples/grpo_tiny_fsdp.yaml", 2, _FSDP_SP2, "examples/grpo_tiny_fake.yaml", ()),
    "grpo-zero3-sp2": ("examples/grpo_tiny_deepspeed.yaml", 2,
                       ('--trainer.strategy.init_args.config={"zero_stage": 3, "bf16": false, "sp_size": 2}',),
                       "examples/grpo_tiny_fake.yaml", ()),
    "grpo-fsdp2-dp2xsp2": ("examples/grpo_tiny_fsdp.yaml", 4, _FSDP_SP2, "examples/grpo_tiny_fake.yaml", ()),
    "ppo-fsdp2-sp2": ("examples/ppo_tiny_fake.yaml", 2, _FSDP_SP2 + _GAE, "examples/ppo_tiny_fake.yaml", _GAE),
}
_ONE_PROCESS: dict[tuple, "grpo_strategies.Recorder"] = {}


@pytest.mark.multiprocess
@pytest.mark.parametrize("run", list(_SP_RUNS))
def test_two_ranks_sp2_equal_one_process(run, tmp_path, monkeypatch):
    """GRPO and PPO (example YAMLs, greedy rollouts) on ranks holding half of every sequence (sp 2; dp 1 on 2
    ranks, dp 2 on 4): the same losses, gradient norms, KL and final actor weights as one process on the whole
    sequences. The ranks of an sp group read the same prompts (the sampler splits over dp). PPO's critic runs
    whole sequences (its attention passes through the hook) and its value loss matches too."""
    monkeypatch.chdir(ROOT)
    config, ranks, extra, ref_config, ref_extra = _SP_RUNS[run]
    out = tmp_path / "steps.json"
    torchrun("grpo_strategies.py", ranks, config, str(out), str(grpo_strategies.STEPS), *extra,
             env={"PYTHONPATH": ROOT, "SP_SIZE": "2"}, timeout=300)
    result = json.loads(out.read_text())
    key = (ref_config, ref_extra)
    if key not in _ONE_PROCESS:
        _ONE_PROCESS[key] = grpo_strategies.run(ref_config, extra=ref_extra)
    one = _ONE_PROCESS[key]
    assert len(result["steps"]) == len(one.steps) == grpo_strategies.STEPS
    metrics = ("loss/policy", "actor/grad_norm", "kl", "reward", "loss/value", "critic/grad_norm")
    for got, ref in zip(result["steps"], one.steps):
        for name in (m for m in metrics if m in ref):
            assert got[name] == pytest.approx(ref[name], rel=TOL, abs=TOL), name
    assert one.steps[0]["actor/grad_norm"] > 0 and set(result["weights"]) == set(one.weights)
    for name, values in one.weights.items():
        # a key projection's bias has a zero gradient in exact arithmetic (softmax ignores a shift shared by every
        # key), and Adam turns its float noise into lr-sized steps: it matches to 1e-4, every other weight to 1e-5
        tol = 1e-4 if "k_proj.bias" in name else TOL
        assert result["weights"][name] == pytest.approx(values, rel=tol, abs=tol), name


@pytest.mark.multiprocess
def test_lightrft_style_script_sp2_equals_one_process(tmp_path):
    """examples/lightrft_style/train_grpo.py with ``--fsdp --sp_size 2`` on 2 ranks against ``--strategy fake``
    in one process. As in LightRFT, each rank gets its own prompts (``setup_dataloader`` splits over every
    rank) and ``sp_data_processor.preprocess`` gathers the sp group's samples; the actor's attention goes
    through the Ulysses hook on left-padded prompts. Greedy rollouts, one sample per prompt and batch-normalized
    advantages (REINFORCE++), so the samples do not depend on which rank drew them: the same rewards, losses and
    saved weights."""
    from safetensors.torch import load_file

    import lightrft_port_example

    def args(out):
        return [*lightrft_port_example.tiny_args(out), "--reward_fn", "tests.scripts.lightrft_port_example:prompt_reward",
                "--temperature", "0", "--n_samples_per_prompt", "1",
                "--advantage_estimator", "reinforce++", "--train_batch_size", "4", "--micro_train_batch_size", "2"]

    sp = script_result(torchrun(str(Path(ROOT, "examples/lightrft_style/train_grpo.py")), 2, *args(tmp_path / "sp"),
                                "--fsdp", "--sp_size", "2", env={"PYTHONPATH": ROOT}, timeout=300))
    one = lightrft_port_example.example().main([*args(tmp_path / "one"), "--strategy", "fake"])
    assert sp["attention"] == "ulysses_sdpa" and one["attention"] == "sdpa"
    assert sp["rewards"] == pytest.approx(one["rewards"], abs=TOL) and len(one["rewards"]) == 2
    assert sp["losses"] == pytest.approx(one["losses"], abs=TOL) and one["rewards"][0] != one["rewards"][1]
    a, b = load_file(tmp_path / "sp/model/model.safetensors"), load_file(tmp_path / "one/model/model.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # the key projection: see test_two_ranks_sp2_equal_one_process (here, at lr 1e-2, its weight too)
        assert float((a[k] - b[k]).abs().max()) < (1e-4 if "k_proj" in k else TOL), k
    from lightrft_lightning.tiny_models import tiny_causal_lm
    from lightrft_lightning.tokenizer import load_tokenizer

    initial = tiny_causal_lm(seed=1, vocab_size=len(load_tokenizer("char"))).state_dict()
    assert max(float((b[k] - initial[k]).abs().max()) for k in b) > 1e-3  # the steps trained


@pytest.mark.parametrize("strategy", ["LightRFTFSDP", "LightRFTDeepSpeed"])
def test_sp_size_that_does_not_divide_the_world_is_refused_before_joining(strategy, monkeypatch):
    import lightrft_lightning
    from lightrft_lightning.config import StrategyConfig

    monkeypatch.setenv("WORLD_SIZE", "3")
    s = getattr(lightrft_lightning, strategy)(config=StrategyConfig(sp_size=2))
    with pytest.raises(ValueError, match="sp_size=2 is invalid for world_size=3; accepted: a positive divisor"):
        s.setup_distributed()
    with pytest.raises(ValueError, match="StrategyConfig.sp_size=0 is invalid"):
        StrategyConfig(sp_size=0)

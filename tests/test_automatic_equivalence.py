"""An ordinary automatic-optimization Lightning project (tied Hugging Face causal LM, AdamW with a warmup
scheduler dict, ``gradient_clip_val``, ``accumulate_grad_batches``, ``self.log(sync_dist=True)``,
validation, ``ModelCheckpoint`` and a resume) trains to Lightning's own ``ddp`` numbers on every strategy,
and resumes exactly."""

from __future__ import annotations

import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.launch import SCRIPTS, script_env, torchrun
from tests.scripts.automatic_equivalence import CASES

DISTRIBUTED = ["lightrft_fsdp", "lightrft_deepspeed_stage_1", "lightrft_deepspeed_stage_2", "lightrft_deepspeed_stage_3"]
TOLERANCE = 1e-5  # fp32, relative to the largest parameter change


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("automatic")
    fake = subprocess.run([sys.executable, str(SCRIPTS / "automatic_equivalence.py"), str(out), "lightrft_fake"],
                          capture_output=True, text=True, timeout=300, env=script_env())
    assert fake.returncode == 0, fake.stderr[-4000:]
    torchrun("automatic_equivalence.py", 2, str(out), "ddp", *DISTRIBUTED, timeout=600)
    return out


def _tag(accumulate: int, clip) -> str:
    return f"acc{accumulate}-{'clip' if clip else 'noclip'}"


def relative_difference(got: dict, expected: dict) -> float:
    """max |got - expected| over max |expected| across all parameters."""
    assert got.keys() == expected.keys()
    diff = max((got[k] - expected[k]).abs().max().item() for k in expected)
    scale = max(expected[k].abs().max().item() for k in expected)
    return diff / scale


@pytest.mark.multiprocess
@pytest.mark.parametrize("accumulate,clip", CASES, ids=[_tag(*c) for c in CASES])
@pytest.mark.parametrize("name", ["lightrft_fake", *DISTRIBUTED])
def test_same_parameters_as_lightning_ddp(runs, name, accumulate, clip):
    tag = _tag(accumulate, clip)
    expected = load_file(str(runs / f"ddp-{tag}.safetensors"))
    rel = relative_difference(load_file(str(runs / f"{name}-{tag}.safetensors")), expected)
    print(f"{name} {tag}: max relative difference to ddp {rel:.1e}")
    assert rel <= TOLERANCE


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["ddp", "lightrft_fake", *DISTRIBUTED])
def test_resume_from_model_checkpoint_is_exact(runs, name):
    straight = load_file(str(runs / f"{name}-{_tag(*CASES[-1])}.safetensors"))
    resumed = load_file(str(runs / f"{name}-resumed.safetensors"))
    assert relative_difference(resumed, straight) == 0.0


@pytest.mark.multiprocess
def test_accumulation_and_clipping_change_the_result(runs):
    # each case is a real test only if it trains differently from the others (ddp's own runs)
    states = {_tag(*c): load_file(str(runs / f"ddp-{_tag(*c)}.safetensors")) for c in CASES}
    tags = list(states)
    for i, a in enumerate(tags):
        for b in tags[i + 1:]:
            assert relative_difference(states[a], states[b]) > 1e-3, (a, b)

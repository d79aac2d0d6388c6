"""A plain Lightning module (manual optimization, actor + critic + frozen ref, the Lightning call shape)
trains the same on every strategy built by name: parameters equal to a plain torch loop (<= 1e-5 fp32),
with and without ``clip_gradients``; the parameter / state-dict names are identical everywhere, and so
is the state dict of a Lightning checkpoint of the module."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lightrft_lightning.checkpoint import read_state_dict
from tests.launch import SCRIPTS, script_env, script_result, torchrun
from tests.scripts.lightning_equivalence import CLIP, plain_loop

DISTRIBUTED = ["lightrft_fsdp", "lightrft_deepspeed_stage_1", "lightrft_deepspeed_stage_2", "lightrft_deepspeed_stage_3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("equivalence")
    fake = subprocess.run([sys.executable, str(SCRIPTS / "lightning_equivalence.py"), str(out), "lightrft_fake"],
                          capture_output=True, text=True, timeout=300, env=script_env())
    assert fake.returncode == 0, fake.stderr[-4000:]
    dist = torchrun("lightning_equivalence.py", 2, str(out), *DISTRIBUTED, timeout=600)
    return out, {**script_result(fake), **script_result(dist)}


@pytest.mark.multiprocess
@pytest.mark.parametrize("clip", [None, CLIP], ids=["noclip", "clip"])
@pytest.mark.parametrize("name", ["lightrft_fake", *DISTRIBUTED])
def test_same_parameters_as_a_plain_loop(runs, name, clip):
    out, _ = runs
    expected = plain_loop(clip)
    got = load_file(str(out / f"{name}-{'clip' if clip else 'noclip'}.safetensors"))
    assert got.keys() == expected.keys()
    diff = max((got[k] - expected[k]).abs().max().item() for k in expected)
    print(f"{name} clip={clip}: max |param diff| vs plain loop {diff:.2e}")
    assert diff <= 1e-5


@pytest.mark.multiprocess
def test_names_and_types_are_the_users_on_every_backend(runs):
    _, summary = runs
    fake = summary["lightrft_fake-noclip"]
    assert fake["parameters"][:2] == ["actor.0.weight", "actor.0.bias"]
    for tag, info in summary.items():
        assert info["parameters"] == fake["parameters"], tag
        assert info["state_dict"] == fake["state_dict"], tag
        assert info["types"][1] == "Linear" and info["types"][0].endswith("Sequential"), (tag, info["types"])


@pytest.mark.multiprocess
def test_lightning_checkpoints_have_the_same_state_dict_on_every_backend(runs):
    out, summary = runs
    expected = plain_loop(None)
    for name in ["lightrft_fake", *DISTRIBUTED]:
        state = read_state_dict(str(out / f"{name}-noclip.ckpt"))
        assert list(state) == summary["lightrft_fake-noclip"]["state_dict"], name  # keys and their order
        diff = max((state[k] - expected[k]).abs().max().item() for k in expected)
        print(f"{name}: checkpoint state_dict max |diff| vs plain loop {diff:.2e}")
        assert diff <= 1e-5, name


def test_clipping_reference_differs_from_unclipped():
    # the clipped case is a real test only if clipping changes the result
    a, b = plain_loop(None), plain_loop(CLIP)
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-3

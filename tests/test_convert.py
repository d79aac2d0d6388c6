"""Conversion tools on real files: DCP -> HF, DeepSpeed (ZeRO-3, 2 ranks) -> HF, HF -> DCP -> HF,
each loading with ``transformers`` ``from_pretrained`` and giving identical logits; an HF model
converted to DCP resumes training under LightRFTFSDP on 2 ranks."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightrft_lightning import LightRFTFake
from lightrft_lightning.convert import main
from lightrft_lightning.tiny_models import tiny_causal_lm
from tests.launch import torchrun

IDS = torch.arange(12).view(2, 6)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def trained_fake(tmp_path):
    strategy = LightRFTFake({"bf16": False, "actor_learning_rate": 1e-2})
    model = tiny_causal_lm(seed=0)
    model, optimizer, _ = strategy.prepare((model, strategy.create_optimizer(model), None))
    strategy.backward(model(input_ids=IDS, labels=IDS).loss, model, optimizer)
    strategy.optimizer_step(optimizer, model, None)
    model.config.save_pretrained(tmp_path / "config")
    strategy.save_ckpt(model, str(tmp_path / "dcp"))
    return model


def test_dcp_to_hf_gives_identical_logits(tmp_path):
    model = trained_fake(tmp_path)
    assert main(["dcp-to-hf", str(tmp_path / "dcp"), str(tmp_path / "hf"), "--config", str(tmp_path / "config")]) == 0
    assert list((tmp_path / "hf").glob("*.safetensors"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert torch.equal(logits(hf), logits(model))


def test_hf_to_dcp_to_hf_round_trip(tmp_path):
    model = tiny_causal_lm(seed=5)
    model.save_pretrained(tmp_path / "hf")
    assert main(["hf-to-dcp", str(tmp_path / "hf"), str(tmp_path / "dcp")]) == 0
    strategy = LightRFTFake({"bf16": False})
    other = strategy.prepare(tiny_causal_lm(seed=6))
    strategy.load_ckpt(other, str(tmp_path / "dcp"), load_module_only=True)
    assert torch.equal(logits(other), logits(model))
    assert main(["dcp-to-hf", str(tmp_path / "dcp"), str(tmp_path / "hf2"), "--config", str(tmp_path / "hf")]) == 0
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "hf2", dtype=torch.float32)), logits(model))


def test_hf_to_dcp_resumes_under_fsdp_on_2_ranks(tmp_path):
    tiny_causal_lm(seed=5).save_pretrained(tmp_path / "hf")
    assert main(["hf-to-dcp", str(tmp_path / "hf"), str(tmp_path / "dcp")]) == 0
    out = torchrun("ckpt_hf_fsdp.py", 2, str(tmp_path / "hf"), str(tmp_path / "dcp"), timeout=240).stdout
    diff, moved = re.search(r"HF_FSDP max_diff=(\S+) moved=(\S+)", out).groups()
    assert float(diff) == 0.0 and moved == "True"


def test_deepspeed_zero3_to_hf_gives_identical_logits(tmp_path):
    torchrun("ckpt_convert_ds.py", 2, str(tmp_path), timeout=240)
    assert main(["deepspeed-to-hf", str(tmp_path / "ds"), str(tmp_path / "hf"), "--config", str(tmp_path / "config")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert torch.equal(logits(hf), torch.load(tmp_path / "logits.pt", weights_only=True))


def test_conversion_errors_name_the_problem(tmp_path, capsys):
    trained_fake(tmp_path)
    assert main(["dcp-to-hf", str(tmp_path / "nope"), str(tmp_path / "o"), "--config", str(tmp_path / "config")]) == 1
    assert "nope' is not a directory" in capsys.readouterr().err
    assert main(["dcp-to-hf", str(tmp_path / "dcp"), str(tmp_path / "o"), "--config", str(tmp_path)]) == 1
    assert "has no config.json" in capsys.readouterr().err
    tiny_causal_lm(num_hidden_layers=3).config.save_pretrained(tmp_path / "big")
    assert main(["dcp-to-hf", str(tmp_path / "dcp"), str(tmp_path / "o"), "--config", str(tmp_path / "big")]) == 1
    assert "does not hold the weights of this model: missing ['model.layers.2." in capsys.readouterr().err
    assert main(["hf-to-dcp", str(tmp_path / "config"), str(tmp_path / "o")]) == 1
    assert "has no *.safetensors files" in capsys.readouterr().err
    assert main(["deepspeed-to-hf", str(tmp_path / "dcp"), str(tmp_path / "o"), "--config", str(tmp_path / "config"),
                 "--tag", "missing"]) == 1
    assert "missing does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["dcp-to-torch"])
    assert "invalid choice: 'dcp-to-torch'" in capsys.readouterr().err

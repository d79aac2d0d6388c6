"""DeepSpeed reads its checkpoints with ``torch.load(weights_only=False)``; inside
``weights_only_loads`` those reads refuse arbitrary pickles and still load DeepSpeed's own classes."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from lightrft_lightning.parallel.deepspeed_loading import weights_only_loads


class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_an_arbitrary_pickle_is_refused_even_when_the_caller_asks_weights_only_false(tmp_path):
    marker = str(tmp_path / "code-ran")
    torch.save({"client_state": Payload(marker)}, tmp_path / "mp_rank_00_model_states.pt")
    with weights_only_loads(), pytest.raises(pickle.UnpicklingError, match="os.mkdir|posix.mkdir"):
        torch.load(tmp_path / "mp_rank_00_model_states.pt", weights_only=False)
    assert not os.path.exists(marker)


def test_zero_to_fp32_refuses_a_tampered_checkpoint(tmp_path):
    marker = str(tmp_path / "code-ran")
    tag = tmp_path / "global_step1"
    tag.mkdir()
    (tmp_path / "latest").write_text("global_step1")
    torch.save({"buffer_names": [], "param_shapes": [], "payload": Payload(marker)}, tag / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {"zero_stage": ZeroStageEnum.gradients}}, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with weights_only_loads(), pytest.raises(pickle.UnpicklingError):
        get_fp32_state_dict_from_zero_checkpoint(str(tmp_path))
    assert not os.path.exists(marker)


def test_deepspeeds_own_checkpoint_classes_load(tmp_path):
    torch.save({"zero_stage": ZeroStageEnum.weights, "loss_scaler": LossScaler(4.0),
                "dynamic": DynamicLossScaler(init_scale=2.0**8, scale_window=1000, min_scale=1.0, delayed_shift=2,
                                           consecutive_hysteresis=False), "w": torch.ones(2)}, tmp_path / "optim.pt")
    with weights_only_loads():
        state = torch.load(tmp_path / "optim.pt", map_location="cpu", weights_only=False)
    assert state["zero_stage"] is ZeroStageEnum.weights
    assert state["loss_scaler"].cur_scale == 4.0 and state["dynamic"].cur_scale == 2.0**8
    assert torch.equal(state["w"], torch.ones(2))


def test_torch_load_is_restored_after_the_context():
    original = torch.load
    with pytest.raises(RuntimeError):
        with weights_only_loads():
            assert torch.load is not original
            raise RuntimeError("boom")
    assert torch.load is original

"""The process group backend: on CUDA one group serves CPU tensors over gloo and CUDA tensors over NCCL
(FSDP2 CPU offload puts shards, gradients and the clip norm in CPU memory; issue 29 risk 1)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lightrft_lightning import StrategyBase, process_group


def test_cuda_ranks_get_a_group_for_cpu_and_cuda_tensors():
    assert process_group.default_backend("cuda") == "cpu:gloo,cuda:nccl"
    assert process_group.default_backend("cpu") == "gloo"


def test_standalone_setup_distributed_joins_with_the_mixed_backend_on_cuda(monkeypatch):
    # CUDA cannot run here: record what setup_distributed asks of torch.distributed on a CUDA machine
    calls = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.setdefault("device", device))
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.setdefault("init", kw))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")

    class Standalone(StrategyBase):
        def _create_engine_groups(self) -> None:
            pass

    Standalone({"train_batch_size": 2}).setup_distributed()
    assert calls["device"] == 1 and calls["init"]["backend"] == "cpu:gloo,cuda:nccl"


@pytest.mark.parametrize("backend,device,expected", [
    ("nccl", "cuda", "cuda"), ("cpu:gloo,cuda:nccl", "cuda", "cuda"), ("cpu:gloo,cuda:nccl", "cpu", "cpu"),
    ("gloo", "cpu", "cpu")])
def test_collectives_run_where_the_group_serves_the_tensor(monkeypatch, backend, device, expected):
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert process_group.collective_device(torch.device(device)).type == expected


def test_a_launchers_local_rank_picks_the_device(monkeypatch):
    # DeepSpeed's launcher passes --local_rank (LightRFT's args.local_rank); torchrun sets $LOCAL_RANK
    calls = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.setdefault("device", device))
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")

    class Standalone(StrategyBase):
        def _create_engine_groups(self) -> None:
            pass

    Standalone({"train_batch_size": 2, "local_rank": 3}).setup_distributed()
    assert calls["device"] == 3

"""bf16-mixed FSDP2 on CUDA/nccl (1 or more GPUs): trains a tiny model, checks dtypes, a DCP
checkpoint round trip and a CPU-offloaded model. Rank 0 prints ``GPU {json}``."""

import json
import os
import shutil
import sys
import tempfile

import torch
import torch.distributed as dist

from lightrft_lightning import get_strategy
from lightrft_lightning.tiny_models import tiny_causal_lm

CONFIG = dict(fsdp=True, bf16=True, train_batch_size=2 * int(os.environ.get("WORLD_SIZE", 1)),
              micro_train_batch_size=2, actor_learning_rate=3e-3, dist_timeout_minutes=2.0)


def main() -> None:
    strategy = get_strategy(dict(CONFIG))
    strategy.setup_distributed()
    model = strategy.prepare(tiny_causal_lm(seed=0, hidden_size=128, intermediate_size=256, num_hidden_layers=4))
    opt = strategy.create_optimizer(model)
    param = next(model.parameters())
    device = strategy.root_device  # cuda:LOCAL_RANK (the script also runs on CPU, as a dry run)
    data = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(0)).to(device)
    losses = []
    for _ in range(20):
        out = model(input_ids=data, labels=data)
        strategy.backward(out.loss, model, opt)
        strategy.optimizer_step(opt, model, None)
        losses.append(strategy.all_reduce(out.loss.item()))
    root = strategy.broadcast(tempfile.mkdtemp())
    strategy.save_ckpt(model, root)
    saved = {k: v.clone() for k, v in strategy.iter_full_params(model)}
    other = strategy.prepare(tiny_causal_lm(seed=9, hidden_size=128, intermediate_size=256, num_hidden_layers=4))
    strategy.create_optimizer(other)
    strategy.load_ckpt(other, root)
    loaded = dict(strategy.iter_full_params(other))

    offload = get_strategy(dict(CONFIG, fsdp_cpu_offload=True))
    offload.setup_distributed()
    off_model = offload.prepare(tiny_causal_lm(seed=0))
    off_opt = offload.create_optimizer(off_model)
    offload.backward(off_model(input_ids=data, labels=data).loss, off_model, off_opt)
    offload.optimizer_step(off_opt, off_model, None)
    result = {
        "backend": dist.get_backend(),
        "world": strategy.dp_world_size,
        "param_dtype": str(strategy.mp_policy.param_dtype),
        "master_dtype": str(param.dtype),
        "logits_dtype": str(out.logits.dtype),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "max_param_diff": max((loaded[k] - v).abs().max().item() for k, v in saved.items()),
        "offload_param_device": str(next(off_model.parameters()).device),
        "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    }
    if strategy.is_rank_0():
        print("GPU " + json.dumps(result), flush=True)
    dist.barrier()
    if strategy.is_rank_0():
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

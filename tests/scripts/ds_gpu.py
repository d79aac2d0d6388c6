"""LightRFTDeepSpeed on CUDA (nccl, one rank per GPU): bf16 and fp16 (dynamic loss scaling) with
ZeRO-2 and ZeRO-3, and fp32 ZeRO-2 with ``adam_offload`` (DeepSpeedCPUAdam), train a tiny model
close to fp32, checkpoints round-trip, and the HF export reloads with the engine's logits. Rank 0 prints ``RESULT {json}``.

    PYTHONPATH=. torchrun --nproc_per_node=<gpus> tests/scripts/ds_gpu.py OUT_DIR   (from the repository root)
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from lightrft_lightning import get_strategy
from lightrft_lightning.tiny_models import tiny_causal_lm
from tests.launch import report

STEPS = 16


def train(precision: str, stage: int, out: Path, adam_offload: bool = False) -> dict:
    strategy = get_strategy(dict(strategy="deepspeed", zero_stage=stage, bf16=precision == "bf16",
                                 fp16=precision == "fp16", adam_offload=adam_offload, micro_train_batch_size=2,
                                 train_batch_size=4 * dist.get_world_size(), actor_learning_rate=1e-3,
                                 dist_timeout_minutes=3.0))
    strategy.setup_distributed()
    model = strategy.prepare(tiny_causal_lm(seed=0))
    optimizer = strategy.create_optimizer(model)
    device = torch.device("cuda", torch.cuda.current_device())
    data = torch.randint(0, 64, (STEPS, 2, 16), generator=torch.Generator().manual_seed(dist.get_rank()))
    losses = []
    for step in range(STEPS):
        ids = data[step].to(device)
        loss = model(input_ids=ids, labels=ids).loss
        strategy.backward(loss, model, optimizer)
        strategy.optimizer_step(optimizer, model, None)
        losses.append(strategy.all_reduce(loss.float().item()))
    engine = model.engine
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    assert next(model.module.parameters()).dtype == dtype and engine.zero_optimization_stage() == stage
    assert all(l == l and abs(l) != float("inf") for l in losses), losses

    ckpt = out / f"{precision}-z{stage}{'-offload' if adam_offload else ''}"
    strategy.save_ckpt(model, str(ckpt / "ckpt"), client_state={"step": STEPS})
    ids = data[0].to(device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    again = strategy.prepare(tiny_causal_lm(seed=1))
    strategy.create_optimizer(again)
    _, client = strategy.load_ckpt(again, str(ckpt / "ckpt"))
    with torch.no_grad():
        reload_diff = (again(input_ids=ids).logits.float() - logits).abs().max().item()
    strategy.save_model(model, None, str(ckpt / "hf"))
    export_diff = 0.0
    if dist.get_rank() == 0:
        hf = AutoModelForCausalLM.from_pretrained(str(ckpt / "hf"), dtype=dtype).to(device).eval()
        with torch.no_grad():
            export_diff = (hf(input_ids=ids).logits.float() - logits).abs().max().item()
    return {"stage": stage, "losses": losses, "skipped_steps": strategy.skipped_steps, "client": client,
            "reload_logit_diff": reload_diff, "export_logit_diff": export_diff}


def main() -> None:
    out = Path(sys.argv[1])
    results = {f"{p}-z{s}": train(p, s, out) for p in ("fp32", "bf16", "fp16") for s in (2, 3)}
    results["fp32-z2-offload"] = train("fp32", 2, out, adam_offload=True)  # DeepSpeedCPUAdam, states on the CPU
    report(results)


if __name__ == "__main__":
    main()

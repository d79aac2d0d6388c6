"""An HF model converted to DCP (``convert hf-to-dcp``) resumes training under LightRFTFSDP on 2
gloo ranks: ``load_ckpt(load_module_only=True)`` gives the HF model's logits, then a training
step runs and changes them. Rank 0 prints ``HF_FSDP max_diff=<float> moved=<bool>``.

Usage: ckpt_hf_fsdp.py HF_DIR DCP_DIR
"""

import sys

import torch
from transformers import AutoModelForCausalLM

from lightrft_lightning import get_strategy
from lightrft_lightning.tiny_models import tiny_causal_lm

IDS = torch.arange(12).view(2, 6)


def main(hf_dir: str, dcp_dir: str) -> None:
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    strategy = get_strategy(dict(strategy="fsdp", fsdp=True, bf16=False, seed=0, micro_train_batch_size=1,
                                 train_batch_size=2, actor_learning_rate=1e-2, dist_timeout_minutes=2.0))
    strategy.setup_distributed()
    model = tiny_causal_lm(seed=123)  # other weights: the checkpoint must replace them all
    optimizer = strategy.create_optimizer(model)
    model, optimizer, _ = strategy.prepare((model, optimizer, None))
    strategy.load_ckpt(model, dcp_dir, load_module_only=True)
    with torch.no_grad():
        diff = float((model(input_ids=IDS).logits - reference(input_ids=IDS).logits).abs().max())
    loss = model(input_ids=IDS, labels=IDS).loss
    strategy.backward(loss, model, optimizer)
    stepped = strategy.optimizer_step(optimizer, model, None)
    with torch.no_grad():
        moved = float((model(input_ids=IDS).logits - reference(input_ids=IDS).logits).abs().max()) > 0
    strategy.print(f"HF_FSDP max_diff={diff} moved={moved and stepped}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

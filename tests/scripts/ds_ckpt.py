"""Standalone LightRFTDeepSpeed checkpoints and Hugging Face export, on 2 gloo ranks.

For each ZeRO stage: train, ``save_ckpt``, keep training (reference losses), then a fresh model and
strategy ``load_ckpt`` and must reproduce those losses; rotation keeps ``max_num`` tags; the HF
export (``save_model`` with GatheredParameters, and ``convert.deepspeed_to_hf`` with zero_to_fp32)
loads in transformers with the engine's logits; a frozen model prepared for inference gives the
logits of the unprepared model; a checkpoint holding an arbitrary pickle is refused. Every check raises on failure; rank 0 prints a JSON summary.
"""

import os
import pickle
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from lightrft_lightning import get_strategy
from lightrft_lightning.convert import deepspeed_to_hf
from lightrft_lightning.strategies.deepspeed import DeepSpeedModel
from lightrft_lightning.tiny_models import tiny_causal_lm
from tests.launch import report

class Payload:
    """Runs code when unpickled without weights_only."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


DATA = torch.randint(0, 64, (12, 2, 10), generator=torch.Generator().manual_seed(3))


def build(stage: int):
    strategy = get_strategy(dict(strategy="deepspeed", zero_stage=stage, bf16=False, seed=0, max_norm=1.0,
                                 micro_train_batch_size=1, train_batch_size=4, actor_learning_rate=1e-2,
                                 dist_timeout_minutes=3.0))
    strategy.setup_distributed()
    model = tiny_causal_lm(seed=0)
    optimizer = strategy.create_optimizer(model)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    model, optimizer, scheduler = strategy.prepare((model, optimizer, scheduler))
    return strategy, model, optimizer, scheduler


def train(strategy, model, optimizer, scheduler, micro_steps: range) -> list[float]:
    losses = []
    for step in micro_steps:
        ids = DATA[step, strategy.dp_rank:strategy.dp_rank + 1]
        loss = model(input_ids=ids, labels=ids).loss
        strategy.backward(loss, model, optimizer)
        strategy.optimizer_step(optimizer, model, scheduler)
        losses.append(strategy.all_reduce(loss.item()))
    return losses


def check(stage: int, root: Path) -> dict:
    ckpt = root / f"z{stage}" / "ckpt"
    strategy, model, optimizer, scheduler = build(stage)
    assert isinstance(model, DeepSpeedModel) and model.engine.zero_optimization_stage() == stage
    train(strategy, model, optimizer, scheduler, range(0, 4))
    for tag in ("a", "b"):  # rotation: with max_num=2 the oldest of three goes
        strategy.save_ckpt(model, str(ckpt), tag=f"old-{tag}", max_num=2)
    path = strategy.save_ckpt(model, str(ckpt), max_num=2, client_state={"consumed_samples": 8})
    assert path == str(ckpt / "global_step2"), path
    reference = train(strategy, model, optimizer, scheduler, range(4, 12))
    lr_after = scheduler.get_last_lr()[0]
    tags = sorted(p.name for p in ckpt.iterdir() if p.is_dir())
    assert tags == ["global_step2", "old-b"], tags
    assert (ckpt / "latest").read_text().strip() == "global_step2"

    strategy2, model2, optimizer2, scheduler2 = build(stage)
    loaded, client = strategy2.load_ckpt(model2, str(ckpt))
    assert client == {"consumed_samples": 8}, client
    assert strategy2.stepper(model2).steps == 2 and scheduler2.get_last_lr()[0] == 1e-2 * 0.25
    resumed = train(strategy2, model2, optimizer2, scheduler2, range(4, 12))
    resume_diff = max(abs(a - b) for a, b in zip(reference, resumed))
    assert resume_diff < 1e-6, (reference, resumed)
    assert scheduler2.get_last_lr()[0] == lr_after

    # Hugging Face export of the trained weights (GatheredParameters), and zero_to_fp32 of the checkpoint
    hf_dir, z2f_dir = root / f"z{stage}" / "hf", root / f"z{stage}" / "hf_from_ckpt"
    strategy2.save_model(model2, None, str(hf_dir))
    ids = DATA[0]
    with torch.no_grad():
        logits = model2(input_ids=ids).logits.float()
    export_diff = zero_to_fp32_diff = 0.0
    if strategy2.is_rank_0():
        hf = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
        assert any(f.suffix == ".safetensors" for f in hf_dir.iterdir())
        with torch.no_grad():
            export_diff = (hf(input_ids=ids).logits - logits).abs().max().item()
        deepspeed_to_hf(str(ckpt), str(z2f_dir), str(hf_dir))  # hf_dir: the model's config
        from_ckpt = AutoModelForCausalLM.from_pretrained(str(z2f_dir)).eval()
    # the checkpoint holds the weights as of global_step2, which model2 has moved away from: compare to a reload
    strategy3, model3, _, _ = build(stage)
    strategy3.load_ckpt(model3, str(ckpt), load_module_only=True)
    with torch.no_grad():
        ckpt_logits = model3(input_ids=ids).logits.float()
    if strategy2.is_rank_0():
        with torch.no_grad():
            zero_to_fp32_diff = (from_ckpt(input_ids=ids).logits - ckpt_logits).abs().max().item()
        assert export_diff <= 1e-5 and zero_to_fp32_diff <= 1e-5, (export_diff, zero_to_fp32_diff)

    # a tampered checkpoint: DeepSpeed's reader asks weights_only=False, ours refuses the payload
    marker = root / f"z{stage}" / "code-ran"
    strategy2.save_ckpt(model2, str(root / f"z{stage}" / "tampered"), client_state={"payload": Payload(str(marker))})
    try:
        strategy2.load_ckpt(model2, str(root / f"z{stage}" / "tampered"))
        raise AssertionError("a checkpoint holding an arbitrary pickle loaded")
    except pickle.UnpicklingError as err:
        assert "mkdir" in str(err), err
    assert not marker.exists()

    # a frozen model prepared for inference (stage 3: partitioned, else stage 0) keeps its outputs
    ref = strategy2.prepare(tiny_causal_lm(seed=7))
    assert ref.engine.zero_optimization_stage() == (3 if stage == 3 else 0)
    assert not any(p.requires_grad for p in ref.parameters())
    with torch.no_grad():
        ref_diff = (ref(input_ids=ids).logits - tiny_causal_lm(seed=7)(input_ids=ids).logits).abs().max().item()
    assert ref_diff <= 1e-5, ref_diff
    return {"resume_loss_diff": resume_diff, "export_logit_diff": export_diff,
            "zero_to_fp32_logit_diff": zero_to_fp32_diff, "ref_logit_diff": ref_diff}


def main() -> None:
    root = Path(sys.argv[1])
    stages = [int(s) for s in sys.argv[2:]] or [1, 3]
    summary = {f"z{stage}": check(stage, root) for stage in stages}
    report(summary)


if __name__ == "__main__":
    main()

"""A pretrained actor on the real SmolLM2-135M-Instruct, partitioned (ZeRO-3) or sharded (FSDP2) straight from its
safetensors under a Trainer: 2 CPU ranks, GRPO with a KL reference, 2 steps (tests/scripts/pretrained_setup.py,
the test's script, with the model's own tokenizer). Prints, per strategy and precision: what each rank held at
set-up, how many whole-model ``from_pretrained`` calls ``fit`` made, whether the gathered weights are the
checkpoint's bit for bit (fp32; under bf16-mixed they are held rounded to bf16, so False), and whether the 2 steps log the numbers of the actor loaded whole before the
Trainer.

Usage: DS_ACCELERATOR=cpu python bench/check_pretrained_real.py [STRATEGY ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.launch import script_result, torchrun  # noqa: E402

NAME = "smollm2-135m-instruct"
CASES = (("lightrft_deepspeed_stage_3", "32-true"), ("lightrft_deepspeed_stage_3", "bf16-mixed"),
         ("lightrft_fsdp", "32-true"))
TIMING = ("time/", "perf/", "rollout/")


def run(path: str, strategy: str, precision: str, mode: str) -> dict:
    return script_result(torchrun("pretrained_setup.py", 2, path, strategy, "grpo", mode, precision, NAME, timeout=900))


def main(strategies: tuple[str, ...]) -> None:
    from lightrft_lightning import pretrained

    path = pretrained.resolve(NAME)
    for strategy, precision in CASES:
        if strategies and strategy not in strategies:
            continue
        meta, loaded = run(path, strategy, precision, "meta"), run(path, strategy, precision, "loaded")
        strip = [{k: v for k, v in step.items() if not k.startswith(TIMING)} for step in meta["steps"]]
        same = strip == [{k: v for k, v in step.items() if not k.startswith(TIMING)} for step in loaded["steps"]]
        print(f"{strategy} {precision}: held at set-up {meta['held']}, whole-model loads during fit "
              f"{meta['whole_model_loads']}, gathered weights are the checkpoint's {meta['weights_are_the_checkpoints']}, "
              f"2 steps equal to the actor loaded whole: {same} (loss/policy {[s['loss/policy'] for s in meta['steps']]}, "
              f"kl {[s.get('kl') for s in meta['steps']]})", flush=True)


if __name__ == "__main__":
    main(tuple(sys.argv[1:]))

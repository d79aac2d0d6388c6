"""The ported LightRFT-style example (``examples/lightrft_style/train_grpo.py``) on 2 CPU ranks: FSDP2
then DeepSpeed ZeRO-2 in one launch, the tiny model for 2 steps each.

Usage: torchrun --nproc_per_node=2 lightrft_port_example.py DIR
Prints ``RESULT {json}`` on rank 0: each backend's result dict from the example.
"""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def example():
    spec = importlib.util.spec_from_file_location("train_grpo", ROOT / "examples" / "lightrft_style" / "train_grpo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_args(out: Path, *extra: str) -> list[str]:
    return ["--pretrain", "tiny", "--max_steps", "2", "--generate_max_len", "4", "--actor_learning_rate", "1e-2",
            "--save_path", str(out / "model"), "--ckpt_path", str(out / "ckpt"),
            "--reward_fn", "tests.scripts.lightrft_port_example:digit_reward", *extra]


def main() -> None:
    from tests.launch import report

    root = Path(sys.argv[1])
    train_grpo = example()
    results = {"fsdp": train_grpo.main(tiny_args(root / "fsdp", "--fsdp")),
               "deepspeed": train_grpo.main(tiny_args(root / "deepspeed", "--zero_stage", "2"))}
    report(results)


if __name__ == "__main__":
    main()


def digit_reward(prompts, completions, metadata):
    """A reward the random tiny model's samples differ on (the share of digits), so advantages are not 0."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def prompt_reward(prompts, completions, metadata):
    """A reward that differs between prompts (a random model's greedy samples score alike under digit_reward),
    so that batch-normalized advantages are not 0."""
    return [(len(p) + sum(map(ord, p))) % 5 / 4 for p in prompts]

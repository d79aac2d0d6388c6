"""Every code block of the seed README's "Usage Examples", "Best Practices", "Advanced Features" and
"Extending the Framework" runs with ``lightrft_lightning`` in place of ``lightrft.strategy``.

Names a snippet leaves undefined (``args``, ``actor``, ``dataloader``...) are real tiny models and
data; placeholder calls ``Cls(...)`` get ``args``. Blocks that need a backend module skip while
that module is missing.
"""

import argparse
import importlib.util
import io
import re
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

import lightrft_lightning
from lightrft_lightning import LightRFTFake, StrategyBase, get_strategy, register_strategy
from lightrft_lightning.tiny_models import tiny_causal_lm

SEED = Path(__file__).parent / "data" / "lightrft-strategy-README.md"
SECTIONS = ("Usage Examples", "Best Practices", "Advanced Features", "Extending the Framework")


def seed_blocks() -> list[tuple[str, str]]:
    """(title, code) for each python block in SECTIONS, titled by its ### heading (+ index)."""
    blocks, section, heading, count = [], None, None, {}
    lines = SEED.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section, heading = line[3:].strip(), line[3:].strip()
        elif line.startswith("### "):
            heading = line[4:].strip()
        elif line.startswith("```python") and section in SECTIONS:
            end = lines.index("```", i + 1)
            count[heading] = count.get(heading, 0) + 1
            blocks.append((f"{heading} #{count[heading]}", "\n".join(lines[i + 1 : end])))
            i = end
        i += 1
    return blocks


def port(code: str) -> str:
    """What a LightRFT user changes: the import path (and we fill the snippets' `...` placeholders)."""
    code = re.sub(r"lightrft\.strategy\.(fake_strategy|strategy_base)\b", "lightrft_lightning", code)
    code = code.replace("lightrft.strategy", "lightrft_lightning")
    return code.replace("(...)", "(args)")


NEEDS = {  # blocks that construct a real backend
    "Configuration-Driven Usage #1": ("deepspeed",),
    "Switching Between Backends #1": ("deepspeed", "fsdp"),
    "2. Let the Factory Choose the Strategy #2": ("deepspeed", "fsdp"),
}


def fake_args(**overrides) -> argparse.Namespace:
    values = dict(strategy="fake", seed=42, train_batch_size=2, micro_train_batch_size=1, bf16=False,
                  actor_learning_rate=1e-3, fsdp=False, zero_stage=2)
    values.update(overrides)
    return argparse.Namespace(**values)


class RecordingEngine:
    """Records calls with vLLM's ``LLM.sleep(level)`` / ``LLM.wake_up(tags)`` signatures."""

    def __init__(self):
        self.calls = []

    def sleep(self, level: int = 1) -> None:
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None) -> None:
        self.calls.append(("wake_up", tags))


def namespace(title: str) -> dict:
    torch.manual_seed(0)
    ns = {name: getattr(lightrft_lightning, name) for name in ("FakeStrategy", "StrategyConfig", "get_strategy")}
    args = fake_args()
    if title in NEEDS:  # the snippet chooses the backend itself through args.fsdp
        args = fake_args(strategy=None)
        ns.update(FSDPV2Strategy=lightrft_lightning.FSDPV2Strategy, DeepspeedStrategy=lightrft_lightning.DeepspeedStrategy)
    actor = tiny_causal_lm(seed=1)
    batches = [torch.randint(0, 64, (1, 16)) for _ in range(8)]
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ns.update(
        args=args, actor=actor, critic=tiny_causal_lm(seed=2), reward_model=tiny_causal_lm(seed=3),
        ref_model=tiny_causal_lm(seed=1), dataloader=[batches[0]] * 8, scheduler=None,
        compute_loss=lambda batch: ns["actor"](input_ids=batch, labels=batch).loss,
        model=model, optimizer=optimizer, loss=model(torch.ones(2, 4)).pow(2).mean(),
        strategy=LightRFTFake(args), step=1, vllm_engine=RecordingEngine(), sglang_engine=RecordingEngine(),
    )
    return ns


BLOCKS = seed_blocks()


def test_seed_blocks_found():
    titles = [t for t, _ in BLOCKS]
    assert len(BLOCKS) >= 14, titles
    assert "Basic Usage #1" in titles and "Multi-Model Preparation #1" in titles


@pytest.mark.parametrize("title,code", BLOCKS, ids=[t for t, _ in BLOCKS])
def test_seed_block_runs(title, code, tmp_path, monkeypatch):
    for module in NEEDS.get(title, ()):
        if importlib.util.find_spec(f"lightrft_lightning.strategies.{module}") is None:
            pytest.skip(f"needs the {module} strategy")
    monkeypatch.chdir(tmp_path)
    ns = namespace(title)
    before = {k: v.clone() for k, v in ns["actor"].state_dict().items()}
    out = io.StringIO()
    with redirect_stdout(out):
        exec(compile(port(code), f"<seed: {title}>", "exec"), ns)
    check_block(title, ns, before, out.getvalue(), tmp_path)


def check_block(title: str, ns: dict, before: dict, stdout: str, tmp_path: Path) -> None:
    """What each snippet must have done (beyond not raising)."""
    if title == "Basic Usage #1":
        changed = any(not torch.equal(before[k], v) for k, v in ns["actor"].state_dict().items())
        assert changed, "the training loop did not update the actor"
        assert (tmp_path / "checkpoints/step_1000/latest").is_file()
        fresh = LightRFTFake(ns["args"])
        reloaded = fresh.prepare(tiny_causal_lm(seed=9))
        fresh.load_ckpt(reloaded, "checkpoints/step_1000")
        assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), ns["actor"].state_dict().values()))
    elif title == "Configuration-Driven Usage #1":
        assert type(ns["strategy"]).__name__ == "LightRFTDeepSpeed" and ns["strategy"].config.zero_stage == 2
    elif title == "Testing with FakeStrategy #1":
        assert (tmp_path / "test_checkpoints/latest").is_file()
        assert ns["model"].weight.grad is not None
    elif title == "Switching Between Backends #1":
        assert type(ns["strategy"]).__name__ == "LightRFTFSDP"
    elif title == "1. Use StrategyConfig for Parameter Access #1":
        assert ns["seed"] == 42 and ns["config"].args is ns["args"]
    elif title == "3. Use FakeStrategy for Testing #1":
        ns["test_training_loop"]()
    elif title == "4. Consistent Logging #1":
        assert stdout.startswith("Training step 1, loss: ")
    elif title == "Inference Engine Integration #1":
        for engine in (ns["vllm_engine"], ns["sglang_engine"]):
            assert engine.calls == [("sleep", 1), ("wake_up", None)]
    elif title == "Multi-Model Preparation #1":
        assert all(not m.training for m in (ns["critic"], ns["reward_model"], ns["ref_model"]))
    elif title == "Custom Optimizer Creation #1":
        group = ns["optimizer"].param_groups[0]
        assert (group["lr"], group["betas"], group["weight_decay"]) == (1e-5, (0.9, 0.95), 0.1)
    elif title == "Extending the Framework #1":
        custom = ns["MyCustomStrategy"]
        assert issubclass(custom, StrategyBase)
        register_strategy("my_custom", custom, override=True)
        assert isinstance(get_strategy({"strategy": "my_custom"}), custom)

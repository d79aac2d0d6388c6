"""An example YAML (GRPO, built by the LightningCLI) run for 2 steps; writes each step's logged metrics.

    torchrun --nproc_per_node=2 grpo_strategies.py examples/grpo_tiny_fsdp.yaml OUT.json [STEPS [CLI ARGS...]]

Greedy rollouts (temperature 0) make every prompt's completions independent of how prompts are
split over ranks, so 2 ranks and 1 process must log the same loss and gradient norm. Also imported
by tests/test_grpo.py (``run``) for the one-process reference with examples/grpo_tiny_fake.yaml.

``SHIFT_ENGINE_LOGPROBS=x`` (environment) simulates a stale engine for the off-policy correction: the
engine's log-prob of token ``t`` moves by ``-x * (t % 3 - 1)``, a ratio pi_old / mu of e^x, 1 or e^-x
that depends on the token alone (so on no split over ranks).
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import torch
from lightning.pytorch.callbacks import Callback

from lightrft_lightning.cli import LightRFTCLI

PROMPTS_PER_STEP = 8  # over all ranks
STEPS = 2


def digit_reward(prompts, completions, metadata):
    """A dense reward (mean digit / 9) so that greedy rollouts of a random model differ in reward."""
    return [sum(map(int, c)) / (9 * max(len(c), 1)) for c in completions]


class Recorder(Callback):
    """Each step's logged metrics, plus the dtypes of the actor's parameters, of the optimizer's
    (master) parameters and of the rollout engine's weights (``"none"`` on ranks without an engine)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.dtypes: dict[str, str] = {}
        self.adapters: list[str] = []
        self.weights: dict[str, list[float]] = {}

    def on_fit_end(self, trainer, pl_module) -> None:
        # the actor's whole weights after the last step (every rank joins the gather; a few values per tensor)
        full = trainer.strategy.full_state_dict(pl_module.actor)
        self.weights = {k: v.float().flatten()[:8].tolist() + [float(v.float().sum())] for k, v in full.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from lightrft_lightning.callbacks import RolloutEngineCallback

        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items()})
        engine = next(cb.engine for cb in trainer.callbacks if isinstance(cb, RolloutEngineCallback))
        # how the LoRA adapters are held: DTensor shards (FSDP2), ZeRO-3 partitions, or plain
        self.adapters = sorted({"DTensor" if hasattr(p, "full_tensor") else "zero3" if hasattr(p, "ds_id") else "plain"
                                for n, p in pl_module.actor.named_parameters() if ".lora_" in n})
        self.dtypes = {"actor": str({p.dtype for p in pl_module.actor.parameters()}),
                       "master": str({p.dtype for g in trainer.optimizers[0].param_groups for p in g["params"]}),
                       "engine": str(next(engine.model.parameters()).dtype) if engine is not None else "none"}


class StaleEngine(Callback):
    """Shift the engine's log-probs by ``-shift * (token % 3 - 1)`` (see the module docstring)."""

    def __init__(self, shift: float) -> None:
        self.shift = shift

    def on_fit_start(self, trainer, pl_module) -> None:
        from lightrft_lightning.callbacks import find_rollout_callback

        callback = find_rollout_callback(trainer)
        generate = callback.generate

        def stale(module, prompt_ids, params):
            out = generate(module, prompt_ids, params)
            for c in out:
                c.logprobs = [lp - self.shift * (t % 3 - 1) for t, lp in zip(c.token_ids, c.logprobs)]
            return out

        callback.generate = stale


def run(config: str, world: int = 1, steps: int = STEPS, extra: tuple[str, ...] = (), shift: float = 0.0,
        sp: int = 1) -> Recorder:
    """``sp``: ranks per sequence (``StrategyConfig.sp_size``, given in ``extra``): the ranks of an sp group
    read the same prompts."""
    m = "--model.init_args."
    args = ["--config", config, f"--trainer.devices={world}", f"--trainer.max_steps={steps}", "--trainer.logger=false",
            "--trainer.enable_checkpointing=false", "--trainer.enable_model_summary=false",
            f"--data.batch_size={PROMPTS_PER_STEP * sp // world}", "--data.val_path=null", "--data.shuffle=false",
            f"{m}temperature=0", f"{m}n_samples_per_prompt=2", f"{m}micro_train_batch_size=4", f"{m}epochs=2",
            f"{m}advantage_estimator=reinforce++", f"{m}kl_coef=0.05", f"{m}kl_estimator=k2",
            f"{m}actor_learning_rate=0.01", f'{m}rewards={{"grpo_strategies:digit_reward": 1.0}}', *extra]
    cli = LightRFTCLI(args=args, run=False, save_config_callback=None)
    recorder = Recorder()
    cli.trainer.callbacks.append(recorder)
    if shift:
        cli.trainer.callbacks.append(StaleEngine(shift))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return recorder


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    recorder = run(sys.argv[1], int(os.environ.get("WORLD_SIZE", "1")), steps=int(sys.argv[3]) if len(sys.argv) > 3 else STEPS,
                   extra=tuple(sys.argv[4:]), shift=float(os.environ.get("SHIFT_ENGINE_LOGPROBS", "0")),
                   sp=int(os.environ.get("SP_SIZE", "1")))
    if int(os.environ.get("RANK", "0")) == 0:
        with open(sys.argv[2], "w") as f:
            json.dump({"steps": recorder.steps, "dtypes": recorder.dtypes, "adapters": recorder.adapters,
                       "weights": recorder.weights}, f)

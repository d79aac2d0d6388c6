"""A multi-turn GRPO run (MultiTurnRollout, an environment that answers with feedback) for 2 steps on
one strategy; writes each step's logged metrics.

    torchrun --nproc_per_node=2 multiturn_grpo.py {fsdp|zero3} OUT.json [MODEL_DIR URL[,URL]]
    (tests/test_episodes.py imports ``run`` for the one-process reference, strategy "fake")

With ``MODEL_DIR`` (a Hugging Face directory with its tokenizer) the policy is that model, and with the
URLs of vLLM servers serving it the rollouts run there (``engine_type="vllm_server"``,
tests/vllm/test_episodes_vllm.py), weights pushed before each rollout.

Greedy episodes (temperature 0) do not depend on how prompts are split over ranks, so 2 ranks and one
process log the same loss and gradient norm.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from typing import Optional

import lightning.pytorch as pl
import torch

from lightrft_lightning.algorithms import Advantages, GRPOLoss, Policy, RLModule, Training
from lightrft_lightning.algorithms.environments import Environment, Step
from lightrft_lightning.algorithms.episodes import MultiTurnRollout
from lightrft_lightning.callbacks import RolloutEngineCallback
from lightrft_lightning.data import PromptDataModule
from lightrft_lightning.tasks import counting_prompts
from lightrft_lightning.tokenizer import CHAR_CHAT_TEMPLATE

PROMPTS_PER_STEP = 4  # over all ranks


class Feedback(Environment):
    """Reward per turn: the completion's distinct characters / its length; feedback twice, done on the third turn."""

    def reset(self, row):
        self.turns = 0
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, completion):
        self.turns += 1
        reward = len(set(completion)) / max(len(completion), 1)
        return Step([{"role": "user", "content": f"no {self.turns}"}], reward=reward, done=self.turns >= 3)


class CharChatRollout(MultiTurnRollout):
    def bind(self, tokenizer) -> None:
        tokenizer.chat_template = CHAR_CHAT_TEMPLATE
        super().bind(tokenizer)


def strategy(name: str, **config):
    if name == "fsdp":
        from lightrft_lightning.strategies.fsdp import LightRFTFSDP
        return LightRFTFSDP({"bf16": False, **config})
    if name == "zero3":
        from lightrft_lightning.strategies.deepspeed import LightRFTDeepSpeed
        return LightRFTDeepSpeed({"zero_stage": 3, "bf16": False, **config})
    from lightrft_lightning import LightRFTFake
    return LightRFTFake({"bf16": False, **config})


def run(name: str, world: int = 1, model: Optional[str] = None, urls: Optional[list[str]] = None) -> list[dict[str, float]]:
    pl.seed_everything(0, verbose=False)
    rollout = CharChatRollout(Feedback, n_samples_per_prompt=1, temperature=0.0, max_new_tokens=4, max_turns=4,
                              max_total_tokens=64)
    policy = Policy(model=model, tokenizer=model) if model else Policy(model_config={"hidden_size": 64,
                                                                                    "intermediate_size": 128})
    module = RLModule(GRPOLoss(), policy, rollout, Advantages(estimator="reinforce"),
                      Training(micro_train_batch_size=2, actor_learning_rate=1e-2))
    steps: list[dict[str, float]] = []

    class Keep(pl.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            steps.append({k: float(v) for k, v in trainer.callback_metrics.items() if not k.startswith(("time/", "perf/"))})

    callbacks: list[pl.Callback] = [Keep()]
    config = {}
    if urls:
        config["engine_type"] = "vllm_server"
        callbacks.append(RolloutEngineCallback(engine_kwargs={"urls": urls, "api_key": "test-key", "timeout_s": 120}))
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strategy(name, **config), max_steps=2, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, enable_checkpointing=False, callbacks=callbacks)
    trainer.fit(module, PromptDataModule(prompts=counting_prompts(16, seed=3), batch_size=PROMPTS_PER_STEP // world,
                                         shuffle=False))
    return steps


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    model_dir, urls = (sys.argv[3], sys.argv[4].split(",")) if len(sys.argv) > 4 else (None, None)
    if urls:
        from tests.vllm.common import set_env

        set_env()
    steps = run(sys.argv[1], int(os.environ.get("WORLD_SIZE", "1")), model_dir, urls)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(sys.argv[2], "w") as f:
            json.dump(steps, f)
    if urls:
        os._exit(0)  # vLLM's exit hooks would tear down process groups the Trainer already destroyed

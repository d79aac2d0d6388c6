"""RLHF algorithms as LightningModules, built from parts: a rollout (prompts to scored experience),
advantages (estimator and shaping), a loss object per algorithm, and the learner that steps them."""

from lightrft_lightning.algorithms.advantages import (Advantages, compute_advantages, gae, group_norm, kl_penalty, rloo,
                                                     whiten)
from lightrft_lightning.algorithms.async_rollout import AsyncRollout
from lightrft_lightning.algorithms.environments import Environment, Step
from lightrft_lightning.algorithms.episodes import MultiTurnRollout
from lightrft_lightning.algorithms.experience import Experience
from lightrft_lightning.algorithms.grpo import GRPO, GRPOLoss
from lightrft_lightning.algorithms.losses import aggregate, kl_loss, policy_loss, value_loss
from lightrft_lightning.algorithms.models import Policy
from lightrft_lightning.algorithms.module import RLModule
from lightrft_lightning.algorithms.training import Training
from lightrft_lightning.algorithms.ppo import PPO, CriticModel, PPOLoss
from lightrft_lightning.algorithms.rewards import CombinedReward, RewardModel, exact_match, load_function
from lightrft_lightning.algorithms.refill import RefillRollout
from lightrft_lightning.algorithms.rollout import Rollout

__all__ = [
    "GRPO", "PPO", "RLModule", "CriticModel", "GRPOLoss", "PPOLoss", "Policy", "Rollout", "RefillRollout", "AsyncRollout",
    "MultiTurnRollout", "Environment", "Step", "Advantages", "Training",
    "Experience", "compute_advantages", "gae", "group_norm", "rloo", "whiten", "kl_penalty", "aggregate", "policy_loss",
    "value_loss", "kl_loss", "CombinedReward", "RewardModel", "exact_match", "load_function",
]

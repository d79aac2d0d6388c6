"""RLHF algorithms as LightningModules, and the advantage, loss and reward functions they share."""

from lightrft_lightning.algorithms.advantages import compute_advantages, gae, group_norm, kl_penalty, rloo, whiten
from lightrft_lightning.algorithms.base import RLModule
from lightrft_lightning.algorithms.grpo import GRPO
from lightrft_lightning.algorithms.losses import aggregate, kl_loss, policy_loss, value_loss
from lightrft_lightning.algorithms.ppo import PPO, CriticModel
from lightrft_lightning.algorithms.rewards import CombinedReward, RewardModel, exact_match, load_function

__all__ = [
    "GRPO", "PPO", "RLModule", "CriticModel", "compute_advantages", "gae", "group_norm", "rloo", "whiten",
    "kl_penalty", "aggregate", "policy_loss", "value_loss", "kl_loss", "CombinedReward", "RewardModel",
    "exact_match", "load_function",
]

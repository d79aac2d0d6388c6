"""Lightning callbacks of lightrft-lightning (installed as ``lightrft_lightning.callbacks``)."""

from lightrft_lightning.callbacks.dcp_checkpoint import DCPCheckpoint
from lightrft_lightning.callbacks.rollout_engine import RolloutEngineCallback, find_rollout_callback

__all__ = ["DCPCheckpoint", "RolloutEngineCallback", "find_rollout_callback"]

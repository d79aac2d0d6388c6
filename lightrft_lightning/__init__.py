"""LightRFT's strategy module as PyTorch Lightning parts.

LightRFT code ports by changing the import: ``from lightrft.strategy import get_strategy`` becomes
``from lightrft_lightning import get_strategy``; ``StrategyBase``, ``StrategyConfig``,
``FakeStrategy``, ``DeepspeedStrategy`` and ``FSDPV2Strategy`` import from here too. Importing the
package registers the strategies by name (``Trainer(strategy="lightrft_fsdp")``, ``get_strategy``).
"""

from __future__ import annotations

from lightrft_lightning.config import StrategyConfig
from lightrft_lightning.factory import available_strategies, get_fake_strategy, get_strategy, register_strategy
from lightrft_lightning.strategies.base import StrategyBase, is_actor, is_engine
from lightrft_lightning.strategies.deepspeed import DeepspeedStrategy, LightRFTDeepSpeed
from lightrft_lightning.strategies.fake import FakeStrategy, LightRFTFake
from lightrft_lightning.strategies.fsdp import FSDPV2Strategy, LightRFTFSDP

__all__ = [
    "StrategyConfig",
    "StrategyBase",
    "get_strategy",
    "get_fake_strategy",
    "is_actor",
    "is_engine",
    "register_strategy",
    "available_strategies",
    "LightRFTFake",
    "FakeStrategy",
    "LightRFTFSDP",
    "FSDPV2Strategy",
    "LightRFTDeepSpeed",
    "DeepspeedStrategy",
]

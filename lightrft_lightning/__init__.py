"""LightRFT's strategy module as PyTorch Lightning parts.

LightRFT code ports by changing the import: ``from lightrft.strategy import get_strategy`` becomes
``from lightrft_lightning import get_strategy``; ``StrategyBase``, ``StrategyConfig``,
``FakeStrategy``, ``DeepspeedStrategy`` and ``FSDPV2Strategy`` import from here too.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from lightning.pytorch.strategies import StrategyRegistry

from lightrft_lightning.config import StrategyConfig
from lightrft_lightning.factory import available_strategies, get_fake_strategy, get_strategy, register_strategy
from lightrft_lightning.strategies.base import StrategyBase, is_actor, is_engine
from lightrft_lightning.strategies.fake import LightRFTFake

FakeStrategy = LightRFTFake

# strategies whose backend may be missing import on first use
_LAZY = {
    "LightRFTFSDP": "lightrft_lightning.strategies.fsdp",
    "FSDPV2Strategy": "lightrft_lightning.strategies.fsdp:LightRFTFSDP",
    "LightRFTDeepSpeed": "lightrft_lightning.strategies.deepspeed",
    "DeepspeedStrategy": "lightrft_lightning.strategies.deepspeed:LightRFTDeepSpeed",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'lightrft_lightning' has no attribute {name!r}")
    module, _, attr = _LAZY[name].partition(":")
    return getattr(importlib.import_module(module), attr or name)


def _register_with_lightning() -> None:
    """Make the strategies usable by name (``Trainer(strategy="lightrft_fsdp")``): each class registers
    its names with its ``register_strategies``, as Lightning's own strategies do."""
    classes = [LightRFTFake]
    for name in ("LightRFTFSDP", "LightRFTDeepSpeed"):
        module = _LAZY[name]
        try:
            classes.append(getattr(importlib.import_module(module), name))
        except ModuleNotFoundError as err:  # a backend that is not installed
            if err.name != module:
                raise
    for cls in classes:
        cls.register_strategies(StrategyRegistry)


_register_with_lightning()

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
] + [name for name, target in _LAZY.items() if importlib.util.find_spec(target.partition(":")[0]) is not None]

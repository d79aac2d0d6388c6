"""`get_strategy`: build a strategy from a config, and `register_strategy` to add your own."""

from __future__ import annotations

import importlib
from typing import Any, Callable

from lightrft_lightning.config import StrategyConfig

StrategyBuilder = Callable[[StrategyConfig], Any]

_BUILDERS: dict[str, StrategyBuilder] = {}


def register_strategy(name: str, builder: StrategyBuilder, *, override: bool = False) -> None:
    """Make ``get_strategy`` build ``builder(config)`` when ``config.strategy == name``.

    ``builder`` is a strategy class or any callable taking a ``StrategyConfig``.
    """
    if name in _BUILDERS and not override:
        raise ValueError(f"register_strategy: a strategy named {name!r} is already registered (pass override=True)")
    _BUILDERS[name] = builder


def available_strategies() -> list[str]:
    return sorted(_BUILDERS)


def get_strategy(args: Any = None) -> Any:
    """Build the strategy that ``args`` asks for.

    ``args`` is a ``StrategyConfig``, an argparse ``Namespace``, a dict or any object with
    attributes. ``args.strategy`` names a registered strategy; without it, ``args.fsdp`` picks
    ``LightRFTFSDP`` when true and ``LightRFTDeepSpeed`` otherwise.
    """
    config = StrategyConfig.from_args(args)
    name = config.strategy or ("fsdp" if config.fsdp else "deepspeed")
    if name not in _BUILDERS:
        raise ValueError(f"StrategyConfig.strategy={name!r} is unknown; accepted: {', '.join(available_strategies())}")
    return _BUILDERS[name](config)


def get_fake_strategy(args: Any = None) -> Any:
    """LightRFT's test helper: a ``LightRFTFake`` (one process, no process group) built from ``args``."""
    from lightrft_lightning.strategies.fake import LightRFTFake

    return LightRFTFake(args=args)


def _lazy(module: str, cls: str) -> StrategyBuilder:
    def build(config: StrategyConfig) -> Any:
        try:
            strategy_cls = getattr(importlib.import_module(module), cls)
        except ModuleNotFoundError as err:
            if err.name == module:
                raise NotImplementedError(f"{cls} is not available yet in this version of lightrft-lightning") from err
            raise
        return strategy_cls(config)

    return build


register_strategy("fake", _lazy("lightrft_lightning.strategies.fake", "LightRFTFake"))
register_strategy("fsdp", _lazy("lightrft_lightning.strategies.fsdp", "LightRFTFSDP"))
register_strategy("deepspeed", _lazy("lightrft_lightning.strategies.deepspeed", "LightRFTDeepSpeed"))

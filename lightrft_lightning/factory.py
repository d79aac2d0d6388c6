"""The one strategy registry: `register_strategy` makes a strategy known to `get_strategy` (LightRFT's
factory) and, for a Lightning strategy class, to `Trainer(strategy=name)` and LightningCLI."""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

from lightning.pytorch.strategies import Strategy, StrategyRegistry

from lightrft_lightning.config import StrategyConfig

StrategyBuilder = Callable[[StrategyConfig], Any]

_BUILDERS: dict[str, StrategyBuilder] = {}


def register_strategy(name: str, builder: StrategyBuilder, *, aliases: Sequence[str] = (), override: bool = False,
                      description: Optional[str] = None, **init_kwargs: Any) -> None:
    """Make ``get_strategy`` build ``builder(config, **init_kwargs)`` when ``config.strategy`` is ``name`` or
    one of ``aliases``. A Lightning ``Strategy`` class is also registered with Lightning under ``name``
    (not the aliases), so ``Trainer(strategy=name)`` builds ``builder(**init_kwargs)``.

    ``builder`` is a strategy class or any callable taking a ``StrategyConfig``.
    """
    names = [name, *aliases]
    taken = [n for n in names if n in _BUILDERS]
    if taken and not override:
        raise ValueError(f"register_strategy: a strategy named {taken[0]!r} is already registered (pass override=True)")
    for n in names:
        _BUILDERS[n] = functools.partial(builder, **init_kwargs) if init_kwargs else builder
    if isinstance(builder, type) and issubclass(builder, Strategy):
        doc = description or (builder.__doc__ or name).strip().splitlines()[0]
        StrategyRegistry.register(name, builder, description=doc, override=True, **init_kwargs)


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


def _register_built_in_strategies() -> None:
    from lightrft_lightning.strategies.deepspeed import LightRFTDeepSpeed
    from lightrft_lightning.strategies.fake import LightRFTFake
    from lightrft_lightning.strategies.fsdp import LightRFTFSDP

    register_strategy("lightrft_fake", LightRFTFake, aliases=("fake",), description="LightRFT API in one process")
    register_strategy("lightrft_fsdp", LightRFTFSDP, aliases=("fsdp",),
                      description="LightRFT API on FSDP2 (CPU and GPU)")
    register_strategy("lightrft_deepspeed", LightRFTDeepSpeed, aliases=("deepspeed",),
                      description="LightRFT DeepSpeed (ZeRO stage from the config), several engines, CPU and CUDA")
    for stage in (1, 2, 3):
        register_strategy(f"lightrft_deepspeed_stage_{stage}", LightRFTDeepSpeed, stage=stage,
                          description=f"LightRFT DeepSpeed ZeRO-{stage}")


_register_built_in_strategies()

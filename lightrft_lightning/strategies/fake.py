"""`LightRFTFake`: the LightRFT API in one process, with no process group and no GPU."""

from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch.strategies import SingleDeviceStrategy

from lightrft_lightning.strategies.base import StrategyBase, seed_everything


class LightRFTFake(StrategyBase, SingleDeviceStrategy):
    """Single-process strategy with the same semantics as the distributed ones (accumulation,
    clipping, non-finite step skipping, DCP checkpoints), for tests and laptops.

    Standalone (``strategy.backward(loss, model, optimizer)``) or as ``Trainer(strategy=LightRFTFake())``.

    Args:
        config: a ``StrategyConfig`` or anything ``StrategyConfig.from_args`` reads.
        device: the device to run on (default CPU).
    """

    strategy_name = "lightrft_fake"

    def __init__(self, config: Optional[Any] = None, device: str = "cpu", **kwargs: Any) -> None:
        SingleDeviceStrategy.__init__(self, device=device, **kwargs)
        StrategyBase.__init__(self, config)

    def setup_distributed(self, timeout: Any = None) -> None:
        """Seed every RNG; a fake strategy joins no process group."""
        seed_everything(self.config.seed)

    def _prepare_model(self, model: Any, optimizer: Any, train: bool) -> tuple[Any, Any]:
        return model.to(self.root_device), optimizer

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        if cls.strategy_name not in strategy_registry:
            strategy_registry.register(cls.strategy_name, cls, description="LightRFT API in one process")

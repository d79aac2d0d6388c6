"""`LightRFTFake`: the LightRFT API in one process, with no process group and no GPU."""

from __future__ import annotations

from typing import Any, Optional

from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch.strategies import SingleDeviceStrategy

from lightrft_lightning import lightning_api
from lightrft_lightning.strategies.base import StrategyBase, lightrft_config


class LightRFTFake(StrategyBase, SingleDeviceStrategy):
    """Single-process strategy with the same semantics as the distributed ones (accumulation,
    clipping, non-finite step skipping, DCP checkpoints), for tests and laptops.

    Standalone (``strategy.backward(loss, model, optimizer)``) or as ``Trainer(strategy=LightRFTFake())``.

    Also built the LightRFT way, ``FakeStrategy(seed=42, max_norm=1.0, micro_train_batch_size=2,
    train_batch_size=8, args=None)``: the values given override those of ``args``.

    Args:
        config: a ``StrategyConfig`` or anything ``StrategyConfig.from_args`` reads.
        device: the device to run on (default CPU).
        seed, max_norm, micro_train_batch_size, train_batch_size, args: LightRFT's constructor (keywords).
    """

    strategy_name = "lightrft_fake"

    def __init__(self, config: Optional[Any] = None, device: str = "cpu", *, seed: Optional[int] = None,
                 max_norm: Optional[float] = None, micro_train_batch_size: Optional[int] = None,
                 train_batch_size: Optional[int] = None, args: Any = None, **kwargs: Any) -> None:
        cfg = lightrft_config(type(self).__name__, config, args, {
            "seed": seed, "max_norm": max_norm, "micro_train_batch_size": micro_train_batch_size,
            "train_batch_size": train_batch_size})
        SingleDeviceStrategy.__init__(self, device=device, **kwargs)
        StrategyBase.__init__(self, cfg)

    @property
    def world_size(self) -> int:
        """Always 1: a fake strategy is one process."""
        return 1

    @world_size.setter
    def world_size(self, value: int) -> None:
        if value != 1:
            raise AttributeError(f"LightRFTFake.world_size is 1; it cannot be set to {value}")

    @property
    def dp_world_size(self) -> int:
        return 1

    @property
    def dp_rank(self) -> int:
        return 0

    def setup_distributed(self, timeout: Any = None, num_gpu_per_node: Optional[int] = None) -> None:
        """Seed every RNG; a fake strategy joins no process group (its engine groups are None)."""
        seed_everything(self.config.seed, verbose=False)

    def training_precision(self) -> str:
        """As on every strategy under a Trainer; standalone "fp32": the fake applies no mixed precision of
        its own (``StrategyConfig.bf16`` is for the FSDP2 and DeepSpeed backends)."""
        if lightning_api.given_precision_plugin(self) is None:
            return "fp32"
        return super().training_precision()

    def _prepare_model(self, model: Any, optimizer: Any, train: bool) -> tuple[Any, Any]:
        return model.to(self.root_device), optimizer


FakeStrategy = LightRFTFake

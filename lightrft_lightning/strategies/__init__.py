"""Lightning strategies with the LightRFT API: one module per backend."""

from lightrft_lightning.strategies.base import StrategyBase
from lightrft_lightning.strategies.fake import LightRFTFake

__all__ = ["StrategyBase", "LightRFTFake"]

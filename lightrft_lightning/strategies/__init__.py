"""Lightning strategies with the LightRFT API: one module per backend."""

from lightrft_lightning.strategies.base import StrategyBase, is_actor, is_engine
from lightrft_lightning.strategies.fake import FakeStrategy, LightRFTFake

__all__ = ["StrategyBase", "LightRFTFake", "FakeStrategy", "is_actor", "is_engine"]

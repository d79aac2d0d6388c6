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
        if cfg.sp_size != 1:
            raise ValueError(
                f"{type(self).__name__}: StrategyConfig.sp_size={cfg.sp_size} is refused; accepted: 1. The fake strategy "
                "is one process, and sequence parallelism splits each sequence over sp_size processes that exchange "
                "attention heads: one process can neither hold another rank's share nor gather the group's data, so "
                "sp_size > 1 here would be accepted and ignored. Run LightRFTFSDP or LightRFTDeepSpeed on sp_size (or a "
                "multiple of it) ranks, e.g. torchrun --nproc_per_node=2 ... --sp_size 2 (CPU works, over gloo)")
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

    # LightRFT's FakeStrategy: engine calls without an engine are no-ops, so trainer code runs on the fake
    # without building one
    def setup_inference_engine(self, args: Any = None, engine_type: Optional[str] = None, actor: Any = None,
                               bucket_bytes: Optional[int] = None, engine_kwargs: Optional[dict] = None) -> Any:
        """As on every strategy; ``setup_inference_engine(None)`` (no args, engine type or actor) builds
        nothing and returns None, as LightRFT's FakeStrategy does."""
        if args is None and engine_type is None and actor is None:
            return None
        return super().setup_inference_engine(args, engine_type, actor, bucket_bytes, engine_kwargs)

    def update_engine_weights(self, actor: Any) -> int:
        """As on every strategy; without an engine nothing is pushed (returns 0)."""
        return 0 if self.inference_engine is None else super().update_engine_weights(actor)

    def engine_generate_local(self, sampling_params: Any, prompt_token_ids: Any = None,
                              multi_modal_inputs: Any = None) -> list:
        """As on every strategy; without an engine, a call without prompts gives ``[]``."""
        if self.inference_engine is None and prompt_token_ids is None and multi_modal_inputs is None:
            return []
        return super().engine_generate_local(sampling_params, prompt_token_ids, multi_modal_inputs)

    def gather_and_generate(self, sampling_params: Any, all_prompt_token_ids: Any = None, all_prompts: Any = None,
                            all_images: Any = None, sleep_engine: bool = True, images_num: Any = None,
                            all_videos: Any = None, videos_num: Any = None) -> list:
        """As on every strategy; without an engine, a call without prompts gives ``[]`` (prompts are checked
        and refused as on every strategy)."""
        no_input = all(x is None for x in (all_prompt_token_ids, all_prompts, all_images, all_videos))
        if self.inference_engine is None and no_input:
            return []
        return super().gather_and_generate(sampling_params, all_prompt_token_ids, all_prompts, all_images, sleep_engine,
                                           images_num, all_videos, videos_num)

    def _prepare_model(self, model: Any, optimizer: Any, train: bool) -> tuple[Any, Any]:
        return model.to(self.root_device), optimizer


FakeStrategy = LightRFTFake

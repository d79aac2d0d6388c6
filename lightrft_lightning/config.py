"""`StrategyConfig`: every knob of a LightRFT strategy as one typed, validated dataclass."""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

ENGINE_TYPES = ("vllm", "sglang", "hf", "vllm_server")
GRAD_ACCUM_DTYPES = (None, "fp32", "bf16", "fp16")
ADVANTAGE_ESTIMATORS = ("gae", "group_norm", "grpo", "dr_grpo", "rloo", "reinforce", "reinforce_baseline",
                        "reinforce++", "reinforce++_baseline", "cpgd")
KL_ESTIMATORS = ("k1", "k2", "k3")
ENGINE_SLEEP_LEVELS = (1, 2)


@dataclass
class RewardShaping:
    """LightRFT's reward and advantage shaping settings, one definition for :class:`StrategyConfig`
    (LightRFT's trainers read them as ``strategy.config.X``) and
    :class:`~lightrft_lightning.algorithms.advantages.Advantages` (which applies them).

    Args:
        reward_clip: clip each sequence reward to ``[-reward_clip, reward_clip]`` (0: off).
        reward_running_norm: divide rewards by the std of all rewards seen so far (all ranks, kept in
            checkpoints); with ``reward_running_norm_minus_mean`` also subtract their mean.
        advantages_norm: whiten the advantages over the response tokens of the rollout (all ranks).
        advantage_clip: clip advantages to ``[-advantage_clip, advantage_clip]`` after that (0: off).
        overlong_buffer: DAPO's soft overlong punishment: a response longer than ``max_new_tokens -
            overlong_buffer_len`` tokens loses ``(length - that) / overlong_buffer_len x
            overlong_buffer_penalty_factor`` reward.
        dynamic_sampling: DAPO's dynamic sampling: prompt groups whose samples all got the same reward
            are left out of the loss (their response tokens are masked, so they count neither in the
            loss nor in its token normalizer); needs ``n_samples_per_prompt >= 2``.
    """

    reward_clip: float = 0.0
    reward_running_norm: bool = False
    reward_running_norm_minus_mean: bool = False
    advantages_norm: bool = False
    advantage_clip: float = 0.0
    overlong_buffer: bool = False
    overlong_buffer_len: int = 1024
    overlong_buffer_penalty_factor: float = 1.0
    dynamic_sampling: bool = False

    def shaping_settings(self) -> dict[str, Any]:
        """The shaping fields and their values."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(RewardShaping)}


@dataclass
class StrategyConfig(RewardShaping):
    """Typed configuration of a strategy, validated when it is built.

    Build it directly, or from a legacy argument object with :meth:`from_args`; attributes it does
    not know are kept in ``extra_args`` and read with :meth:`get_extra_arg`.
    """

    # which strategy `get_strategy` builds: a registered name ("fake", "fsdp", "deepspeed", or one
    # added with `register_strategy`); None picks "fsdp" when `fsdp` is true, else "deepspeed"
    strategy: Optional[str] = None
    seed: int = 42
    # this process's device index when a launcher passes --local_rank (DeepSpeed's); -1: $LOCAL_RANK
    local_rank: int = -1
    dist_timeout_minutes: float = 30.0

    # batch sizes and optimisation; under a Trainer an RLModule writes its own values here at setup
    micro_train_batch_size: int = 1
    train_batch_size: int = 128
    # samples per no-grad scoring forward of a rollout (per rank), and prompts per rollout over all ranks
    micro_rollout_batch_size: int = 1
    rollout_batch_size: int = 128
    max_norm: float = 1.0
    actor_learning_rate: float = 1e-6
    critic_learning_rate: float = 9e-6
    adam_betas: tuple[float, float] = (0.9, 0.95)
    l2: float = 0.0
    lr_warmup_ratio: float = 0.03
    gradient_checkpointing: bool = False

    # precision (standalone; under a Trainer its precision decides, and a config that moves bf16/fp16
    # away from LightRFT's bf16 default must agree with it)
    bf16: bool = True
    fp16: bool = False
    grad_accum_dtype: Optional[str] = None

    # DeepSpeed
    zero_stage: int = 2
    adam_offload: bool = False
    zpg: int = 1
    overlap_comm: bool = False

    # LightRFT's sequence parallelism (Ulysses): ranks per sequence, on LightRFTFSDP and LightRFTDeepSpeed
    sp_size: int = 1

    # FSDP2
    fsdp: bool = False
    fsdp_cpu_offload: bool = False
    shard_size: Optional[int] = None

    # the engine RolloutEngineCallback builds when it is given none ("hf": the built-in HFEngine;
    # "vllm_server": vLLM servers, their URLs in engine_kwargs); tp size and memory fraction are the
    # colocated vLLM's / SGLang's
    engine_type: str = "hf"
    engine_tp_size: int = 1
    engine_mem_util: float = 0.5
    enable_engine_sleep: bool = True
    # None: by engine type, 2 for "vllm"/"sglang" (their weights are pushed before each rollout that
    # follows an optimizer step: level 1 would copy them to host memory and back for nothing), 1 for "hf"
    engine_sleep_level: Optional[int] = None

    # RL knobs read by the algorithms
    n_samples_per_prompt: int = 1
    advantage_estimator: str = "group_norm"
    kl_estimator: str = "k3"
    init_kl_coef: float = 0.001

    # reward and advantage shaping (RewardShaping's fields, inherited): read by GRPO/PPO, which write
    # their Advantages' values here under a Trainer; LightRFT's trainers read them as `strategy.config.X`

    extra_args: dict[str, Any] = field(default_factory=dict)
    args: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.adam_betas, list):
            self.adam_betas = tuple(self.adam_betas)
        self._check_types()
        self._check_values()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_args(cls, args: Any) -> "StrategyConfig":
        """Build a config from an argparse ``Namespace``, a mapping or any object with attributes.

        Known attributes become fields, the rest go to ``extra_args``; ``args`` keeps the original.
        """
        if isinstance(args, StrategyConfig):
            return args
        if args is None:
            return cls()
        if isinstance(args, Mapping):
            values = dict(args)
        elif hasattr(args, "__dict__"):
            values = {k: v for k, v in vars(args).items() if not k.startswith("_")}
        else:
            raise TypeError(
                f"StrategyConfig.from_args: cannot read attributes from {type(args).__name__}; "
                "pass an argparse.Namespace, a dict, a StrategyConfig or an object with attributes"
            )
        names = {f.name for f in dataclasses.fields(cls)} - {"extra_args", "args"}
        known = {k: v for k, v in values.items() if k in names}
        extra = {k: v for k, v in values.items() if k not in names}
        extra.update(values.get("extra_args") or {})
        return cls(**known, extra_args=extra, args=args)

    def get_extra_arg(self, name: str, default: Any = None) -> Any:
        """Read a parameter that is not a field of this config (it came in through ``from_args``)."""
        return self.extra_args.get(name, default)

    # ------------------------------------------------------------------ derived values
    def device_index(self) -> int:
        """The local device of this process: ``local_rank`` when a launcher gave it, else ``$LOCAL_RANK`` (0)."""
        return self.local_rank if self.local_rank >= 0 else int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def precision(self) -> str:
        """"bf16", "fp16" or "fp32", from ``bf16`` / ``fp16``."""
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"


    def accumulation_steps(self, world_size: int) -> int:
        """Micro-steps per optimizer step: ``train_batch_size // (micro_train_batch_size * world_size)``."""
        per_step = self.micro_train_batch_size * world_size
        if self.train_batch_size % per_step:
            raise ValueError(
                f"train_batch_size={self.train_batch_size} must be divisible by "
                f"micro_train_batch_size * world_size = {self.micro_train_batch_size} * {world_size}"
            )
        return self.train_batch_size // per_step

    # ------------------------------------------------------------------ validation
    def _check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            if f.name in ("extra_args", "args"):
                continue
            value = getattr(self, f.name)
            expected = hints[f.name]
            optional = type(None) in typing.get_args(expected)
            if optional:
                if value is None:
                    continue
                expected = next(a for a in typing.get_args(expected) if a is not type(None))
            if not _matches(value, expected):
                raise TypeError(
                    f"StrategyConfig.{f.name} must be {_type_name(expected)}"
                    f"{' or None' if optional else ''}, got {value!r} ({type(value).__name__})"
                )

    def _check_values(self) -> None:
        def bad(name: str, accepted: str) -> None:
            raise ValueError(f"StrategyConfig.{name}={getattr(self, name)!r} is invalid; accepted: {accepted}")

        if self.zero_stage not in (0, 1, 2, 3):
            bad("zero_stage", "0, 1, 2 or 3")
        if self.bf16 and self.fp16:
            raise ValueError("StrategyConfig.bf16 and StrategyConfig.fp16 are both true; accepted: at most one of them")
        for name in ("micro_train_batch_size", "train_batch_size", "micro_rollout_batch_size", "rollout_batch_size"):
            if getattr(self, name) < 1:
                bad(name, "an integer >= 1")
        if self.train_batch_size % self.micro_train_batch_size:
            raise ValueError(
                f"StrategyConfig.train_batch_size={self.train_batch_size} is not divisible by "
                f"micro_train_batch_size={self.micro_train_batch_size}; accepted: a multiple of it"
            )
        for name in ("actor_learning_rate", "critic_learning_rate", "l2", "max_norm", "init_kl_coef", "reward_clip",
                     "advantage_clip", "overlong_buffer_penalty_factor"):
            if getattr(self, name) < 0:
                bad(name, "a number >= 0")
        if self.dist_timeout_minutes <= 0:
            bad("dist_timeout_minutes", "a number > 0")
        if not 0 <= self.lr_warmup_ratio <= 1:
            bad("lr_warmup_ratio", "a number in [0, 1]")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            bad("adam_betas", "two numbers in [0, 1)")
        if self.grad_accum_dtype not in GRAD_ACCUM_DTYPES:
            bad("grad_accum_dtype", ", ".join(map(repr, GRAD_ACCUM_DTYPES)))
        if self.zpg < 1:
            bad("zpg", "an integer >= 1")
        if self.fsdp_cpu_offload and not self.fsdp:
            raise ValueError("StrategyConfig.fsdp_cpu_offload=True needs fsdp=True; accepted: fsdp=True, or adam_offload for DeepSpeed")
        if self.shard_size is not None and self.shard_size < 1:
            bad("shard_size", "None or an integer >= 1")
        if self.engine_type not in ENGINE_TYPES:
            bad("engine_type", ", ".join(ENGINE_TYPES))
        if self.engine_tp_size < 1:
            bad("engine_tp_size", "an integer >= 1")
        if not 0 < self.engine_mem_util <= 1:
            bad("engine_mem_util", "a number in (0, 1]")
        if self.engine_sleep_level is not None and self.engine_sleep_level not in ENGINE_SLEEP_LEVELS:
            bad("engine_sleep_level", "None (by engine type), 1 (weights kept in CPU memory) or 2 (weights dropped)")
        if self.n_samples_per_prompt < 1:
            bad("n_samples_per_prompt", "an integer >= 1")
        if self.advantage_estimator not in ADVANTAGE_ESTIMATORS:
            bad("advantage_estimator", ", ".join(ADVANTAGE_ESTIMATORS))
        if self.kl_estimator not in KL_ESTIMATORS:
            bad("kl_estimator", ", ".join(KL_ESTIMATORS))
        if isinstance(self.sp_size, bool) or not isinstance(self.sp_size, int) or self.sp_size < 1:
            bad("sp_size", "an integer >= 1 that divides the world size (ranks per sequence)")
        if self.overlong_buffer_len < 1:
            bad("overlong_buffer_len", "an integer >= 1")
        if self.reward_running_norm_minus_mean and not self.reward_running_norm:
            raise ValueError("StrategyConfig.reward_running_norm_minus_mean=True needs reward_running_norm=True; "
                             "accepted: reward_running_norm=True, or reward_running_norm_minus_mean=False")


def precision_name(precision: str) -> str:
    """"bf16", "fp16" or "fp32" for a Lightning precision flag ("bf16-mixed", "16-true", "32-true"...) or
    one of those names."""
    flag = str(precision)
    if flag in ("bf16", "fp16", "fp32"):
        return flag
    return "bf16" if flag.startswith("bf16") else "fp16" if flag.startswith("16") else "fp32"


def _matches(value: Any, expected: Any) -> bool:
    origin = typing.get_origin(expected)
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is tuple:
        items = typing.get_args(expected)
        return (
            isinstance(value, tuple)
            and len(value) == len(items)
            and all(_matches(v, t) for v, t in zip(value, items))
        )
    if expected is Any:
        return True
    return isinstance(value, origin or expected)


def _type_name(expected: Any) -> str:
    return getattr(expected, "__name__", str(expected))

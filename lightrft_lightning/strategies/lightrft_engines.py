"""LightRFT's rollout-engine calls: :class:`LightRFTEngineMixin`, thin layers over lightrft-lightning's
engines (built by ``engines.build``, put to sleep and woken by ``engines.sleep``) and their bucketed
weight sync: ``setup_inference_engine``, ``update_engine_weights``, ``engines_sleep`` /
``engines_wake_up``, ``maybe_sleep_inference_engine`` / ``wakeup_inference_engine``,
``engine_generate_local``, ``gather_and_generate`` and ``_build_multimodal_inputs``; the engine's
tensor-parallel groups (``engine_mp_group``); the ``GenerationOutput`` records the calls return and the
``SamplingParams`` conversion they accept.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Optional, Sequence

import torch.distributed as dist

from lightrft_lightning.engines.build import (
    DEFAULT_BUCKET_BYTES,
    build_engine,
    engine_config,
)
from lightrft_lightning.engines.sleep import sleep_engines, wake_engines
from lightrft_lightning.engines.weight_sync import push_weights


class LightRFTEngineMixin:
    """LightRFT's engine attributes and calls, mixed into :class:`StrategyBase` (which provides
    ``config``, ``engines``, ``unwrap_model``, ``_args_config``, ``_accelerator_device`` and ``_barrier``)."""

    def _init_lightrft_engines(self) -> None:
        """The mixin's state (called by ``StrategyBase.__init__``)."""
        self._inference_engine: Any = None
        self._engine_mp_group: Any = None
        self._engine_dp_group: Any = None
        self._engine_config: Any = None  # the EngineConfig setup_inference_engine built with

    @property
    def inference_engine(self) -> Any:
        """The rollout engine (LightRFT's attribute): the one set here, else the first of ``engines``."""
        if self._inference_engine is not None:
            return self._inference_engine
        return self.engines[0] if self.engines else None

    @inference_engine.setter
    def inference_engine(self, engine: Any) -> None:
        self._inference_engine = engine
        if engine is not None and all(e is not engine for e in self.engines):
            self.engines.append(engine)

    @property
    def engine_mp_group(self) -> Any:
        """The process group of this rank's rollout engine (``engine_tp_size`` consecutive ranks); None
        without a process group."""
        return self._engine_mp_group

    @property
    def engine_dp_group(self) -> Any:
        """The ranks holding the same engine tensor-parallel rank (one per engine); None without a process group."""
        return self._engine_dp_group

    def _create_engine_groups(self) -> None:
        """Build the engine tensor-parallel groups (a collective: every rank calls it)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        tp, world, rank = self.config.engine_tp_size, dist.get_world_size(), dist.get_rank()
        if world % tp:
            raise ValueError(f"StrategyConfig.engine_tp_size={tp} is invalid for world_size={world}; accepted: a "
                             "divisor of the world size")
        for start in range(0, world, tp):
            group = dist.new_group(list(range(start, start + tp)))
            if start <= rank < start + tp:
                self._engine_mp_group = group
        for offset in range(tp):
            group = dist.new_group(list(range(offset, world, tp)))
            if rank % tp == offset:
                self._engine_dp_group = group

    def setup_inference_engine(self, args: Any = None, engine_type: Optional[str] = None, actor: Any = None,
                               bucket_bytes: Optional[int] = None, engine_kwargs: Optional[dict] = None) -> Any:
        """Build this rank's rollout engine with :func:`~lightrft_lightning.engines.build.build_engine`
        (``engine_type`` default: the config's): "hf" is the built-in ``HFEngine`` from the actor's config,
        "vllm" / "sglang" load the Hugging Face directory of ``args.pretrain`` (else the actor's
        ``name_or_path``) with ``engine_tp_size`` and ``engine_mem_util``. The engine generates in the
        dtype the actor trains in (bf16 under ``bf16``). With an ``actor`` its weights are pushed (a
        collective under FSDP/ZeRO-3) in buckets of ``bucket_bytes`` (default 256 MiB), then the engine
        sleeps if ``enable_engine_sleep``. ``engine_kwargs``: more engine arguments ("vllm_server": the
        servers' ``urls``, ``api_key``...). Becomes :attr:`inference_engine`."""
        cfg = engine_config(self._args_config(args), self.training_precision(), engine_type=engine_type,
                            bucket_bytes=bucket_bytes, engine_kwargs=engine_kwargs)
        module = self.unwrap_model(actor) if actor is not None else None
        engine = build_engine(cfg, module, model_path=getattr(args, "pretrain", None),
                              device=self._accelerator_device())
        self.inference_engine = engine
        self._engine_config = cfg
        if actor is not None:
            self.update_engine_weights(actor)
        self.maybe_sleep_inference_engine()
        return engine

    def update_engine_weights(self, actor: Any) -> int:
        """Push the actor's (gathered) weights into the rollout engine bucket by bucket; every rank calls
        it. Returns the bytes pushed."""
        engine = self.inference_engine
        if engine is None:
            raise RuntimeError("update_engine_weights: no inference engine; call setup_inference_engine first")
        self.engines_wake_up([engine], ["weights"])
        bucket_bytes = self._engine_config.bucket_bytes if self._engine_config is not None else DEFAULT_BUCKET_BYTES
        engine.tag_weight_version(getattr(self, "optimizer_steps", 0))
        moved = push_weights(self.unwrap_model(actor), engine, bucket_bytes, dtype=engine.dtype)
        self._barrier()
        return moved

    # ------------------------------------------------------------------ sleep and wake (one path)
    def engines_sleep(self, engines: Optional[Iterable[Any]] = None, level: Optional[int] = None) -> None:
        """Put rollout engines (default: the registered ones) to sleep at ``level`` (default
        ``engine_sleep_level``, else the engine type's: 1 for "hf", 2 for "vllm"/"sglang") to free memory for
        training; a no-op when ``enable_engine_sleep`` is false."""
        config = self._engine_config or engine_config(self.config, self.training_precision())
        if config.sleep_level is not None:
            sleep_engines(_engines(engines, self.engines), level or config.sleep_level)

    def engines_wake_up(self, engines: Optional[Iterable[Any]] = None, tags: Optional[Sequence[str]] = None) -> None:
        """Wake rollout engines (default: the registered ones) before generation; ``tags``: a subset of
        ["weights", "kv_cache"] (None: both)."""
        config = self._engine_config
        mem_util = config.mem_util if config is not None and config.engine_type not in ("hf", "vllm_server") else None
        wake_engines(_engines(engines, self.engines), tags, mem_util=mem_util)

    def maybe_sleep_inference_engine(self) -> None:
        """Put the rollout engine to sleep (at :meth:`engines_sleep`'s level) if ``enable_engine_sleep``;
        then every rank meets and cached device memory is freed."""
        engine = self.inference_engine
        if engine is not None and self.config.enable_engine_sleep and not engine.is_sleeping:
            self.engines_sleep([engine])
            self.sync_and_clear_cache()

    def wakeup_inference_engine(self) -> None:
        """Wake the rollout engine if it sleeps (weights, then KV cache)."""
        engine = self.inference_engine
        self.sync_and_clear_cache()
        if engine is not None and engine.is_sleeping:
            self.engines_wake_up([engine])

    def engine_generate_local(self, sampling_params: Any, prompt_token_ids: Optional[Sequence[Sequence[int]]] = None,
                              multi_modal_inputs: Any = None) -> list["GenerationOutput"]:
        """Generate on this rank's engine: one :class:`GenerationOutput` (``prompt_token_ids``,
        ``output_token_ids``, ``logprobs``, ``finish_reason``) per completion, the ``n`` of a prompt
        next to each other. ``sampling_params``: our ``SamplingParams``, vLLM's, or a dict of them."""
        if multi_modal_inputs is not None and prompt_token_ids is not None:
            raise ValueError("engine_generate_local: got both prompt_token_ids and multi_modal_inputs; accepted: one "
                             "of them (as in LightRFT)")
        if multi_modal_inputs is not None:
            raise NotImplementedError("engine_generate_local: multi_modal_inputs cannot be generated: "
                                      "lightrft-lightning's engines take token ids only; accepted: prompt_token_ids")
        if prompt_token_ids is None:
            raise ValueError("engine_generate_local: prompt_token_ids is required (token ids of each prompt)")
        engine = self.inference_engine
        if engine is None:
            raise RuntimeError("engine_generate_local: no inference engine; call setup_inference_engine first")
        prompts = [list(map(int, p)) for p in prompt_token_ids]
        completions = engine.generate(prompts, to_sampling_params(sampling_params))
        return [GenerationOutput(prompt_token_ids=prompts[c.prompt_index], output_token_ids=list(c.token_ids),
                                 logprobs=list(c.logprobs), finish_reason=c.finish_reason) for c in completions]

    @classmethod
    def _build_multimodal_inputs(cls, all_prompts: Sequence[str], all_images: Optional[Sequence[Any]],
                                 images_num: Optional[Sequence[int]], all_videos: Optional[Sequence[Any]],
                                 videos_num: Optional[Sequence[int]]) -> list[dict[str, Any]]:
        """LightRFT's multimodal engine inputs: one dict per prompt in the shape vLLM documents for
        multimodal prompts, ``{"prompt": text, "multi_modal_data": {"image": [...], "video": [...]}}``
        (``multi_modal_data`` only with images or videos; without them, the Qwen-VL placeholders
        ``<|vision_start|><|image_pad|>...<|vision_end|>`` (and ``video_pad``) are removed from the text).

        ``all_images`` (and ``all_videos``) come in either of LightRFT's two formats: nested, where
        ``all_images[i]`` is the list of prompt ``i``'s images (taken when it is a list of
        ``images_num[i]`` items), or flat, one list of every prompt's images in order, sliced by
        ``images_num`` (``[0:n0]``, ``[n0:n0+n1]``...). A video may itself be a list of frames (flat
        format). Differences from LightRFT (which silently drops or truncates): ``images_num=None``
        with images given takes one entry per prompt (a list of its images, one image, or None), and a flat list shorter than the counts raises ``ValueError``.
        """
        prompts = list(all_prompts or [])
        image_lists = cls._split_media("images", prompts, all_images, images_num)
        video_lists = cls._split_media("videos", prompts, all_videos, videos_num)
        inputs: list[dict[str, Any]] = []
        for prompt, images, videos in zip(prompts, image_lists, video_lists):
            data: dict[str, list[Any]] = {}
            if images and images[0] is not None:
                data["image"] = images
            if videos and videos[0] is not None:
                data["video"] = videos
            if data:
                inputs.append({"prompt": prompt, "multi_modal_data": data})
            else:
                prompt = re.sub(r"<\|vision_start\|>(<\|image_pad\|>)+<\|vision_end\|>", "", prompt)
                prompt = re.sub(r"<\|vision_start\|>(<\|video_pad\|>)+<\|vision_end\|>", "", prompt)
                inputs.append({"prompt": prompt})
        return inputs

    @staticmethod
    def _split_media(kind: str, prompts: list[str], items: Optional[Sequence[Any]],
                     counts: Optional[Sequence[int]]) -> list[list[Any]]:
        """Each prompt's list of images (or videos) from LightRFT's nested or flat format."""
        if items is None:
            return [[] for _ in prompts]
        items = list(items)
        if counts is None:
            if len(items) != len(prompts):
                raise ValueError(f"_build_multimodal_inputs: {len(items)} {kind} entries for {len(prompts)} prompts "
                                 f"and {kind}_num=None; accepted: {kind}_num (a count per prompt), or one entry per "
                                 "prompt (a list of that prompt's items, an item, or None)")
            return [list(x) if isinstance(x, list) else [] if x is None else [x] for x in items]
        counts = list(counts)
        if len(counts) != len(prompts):
            raise ValueError(f"_build_multimodal_inputs: {kind}_num has {len(counts)} counts for {len(prompts)} "
                             "prompts; accepted: one count per prompt")
        out, start = [], 0
        for i, num in enumerate(counts):
            if i < len(items) and isinstance(items[i], list) and len(items[i]) == num:  # nested
                out.append(list(items[i]))
            else:  # flat: slice by the counts
                part = items[start:start + num]
                if len(part) != num:
                    raise ValueError(f"_build_multimodal_inputs: prompt {i} needs {num} {kind} from position {start}, "
                                     f"but the flat list has {len(items)} (counts {counts}); accepted: a nested list "
                                     f"(prompt i's {kind} at index i) or a flat list of sum({kind}_num) items")
                out.append(part)
            start += num
        return out

    def gather_and_generate(self, sampling_params: Any, all_prompt_token_ids: Optional[Sequence[Sequence[int]]] = None,
                            all_prompts: Any = None, all_images: Any = None, sleep_engine: bool = True,
                            images_num: Any = None, all_videos: Any = None, videos_num: Any = None) -> list["GenerationOutput"]:
        """LightRFT's rollout call: wake the engine, generate this rank's prompts and return their
        completions; then sleep the engine (``sleep_engine`` and ``enable_engine_sleep``). A
        tensor-parallel vLLM engine (``engine_tp_size`` > 1, over ``engine_mp_group``) gathers the prompts of
        its ranks itself and generates each of them once.

        As in LightRFT, the call is multimodal when ``all_images`` or ``all_videos`` holds an item that
        is not None; then ``all_prompts`` and the media go through :meth:`_build_multimodal_inputs`
        (its errors included), and the call raises ``NotImplementedError``: lightrft-lightning's
        engines take token ids only. Otherwise ``all_prompt_token_ids`` are generated (``all_prompts``
        and all-None media lists, as LightRFT's trainers pass them for text, are ignored)."""
        multimodal = any(media is not None and any(x is not None for x in media) for media in (all_images, all_videos))
        if multimodal:
            inputs = self._build_multimodal_inputs(all_prompts, all_images, images_num, all_videos, videos_num)
            raise NotImplementedError(
                f"gather_and_generate: multimodal prompts ({len(inputs)} built, with images or videos) cannot be "
                "generated: lightrft-lightning's engines (HFEngine, VLLMEngine, SGLangEngine) take token ids only; "
                "accepted: all_prompt_token_ids, with all_images/all_videos None or all-None")
        if all_prompt_token_ids is None:
            raise ValueError("gather_and_generate: all_prompt_token_ids is required (text prompts as token ids)")
        self.wakeup_inference_engine()
        # each rank passes its own prompts: an engine shared by several ranks (a tensor-parallel vLLM
        # engine over engine_mp_group) gathers them itself, so every prompt is generated once
        mine = self.engine_generate_local(sampling_params, all_prompt_token_ids)
        if sleep_engine:
            self.maybe_sleep_inference_engine()
        return mine


class GenerationOutput(dict):
    """One completion as LightRFT's engine calls return it (a dict with attribute access)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def to_sampling_params(params: Any) -> Any:
    """Our ``SamplingParams`` from ours, vLLM's (``max_tokens``), or a dict of either's fields."""
    from lightrft_lightning.engines.base import SamplingParams

    if isinstance(params, SamplingParams):
        return params
    values = dict(params) if isinstance(params, dict) else {
        k: getattr(params, k) for k in ("n", "temperature", "top_p", "top_k", "max_tokens", "max_new_tokens", "seed")
        if getattr(params, k, None) is not None}
    if "max_tokens" in values:
        values["max_new_tokens"] = values.pop("max_tokens")
    accepted = {"n", "temperature", "top_p", "top_k", "max_new_tokens", "seed", "stop_at_eos"}
    unknown = sorted(set(values) - accepted)
    if unknown:
        raise ValueError(f"sampling_params: {unknown} are not supported; accepted: {', '.join(sorted(accepted))} "
                         "(and vLLM's max_tokens)")
    return SamplingParams(**values)


def _engines(engines: Optional[Iterable[Any]], default: list[Any]) -> list[Any]:
    if engines is None:
        return list(default)
    return [engines] if hasattr(engines, "sleep") else [e for e in engines if e is not None]

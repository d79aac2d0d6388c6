"""`Policy`: which causal LM and tokenizer an algorithm trains, and how it builds them."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from lightrft_lightning.lora import LoRASettings, apply_lora
from lightrft_lightning.parallel.meta_init import causal_lm_on_meta
from lightrft_lightning.parallel.sharding import is_sharded
from lightrft_lightning.strategies.base import enable_gradient_checkpointing
from lightrft_lightning.tokenizer import load_tokenizer


def load_causal_lm(model: str, vocab_size: int, model_config: Optional[dict] = None, on_meta: bool = False) -> nn.Module:
    """``"tiny"``: a random-init tiny Qwen2 (``model_config`` overrides its size); else the local HF
    directory :func:`model_dir` gives, in fp32: loaded, or with ``on_meta`` and safetensors weights its parameters
    on the meta device, to take the checkpoint's weights when the strategy materializes or shards it
    (:func:`causal_lm_on_meta`; other weight files load whole, as before)."""
    if model == "tiny":
        from lightrft_lightning.tiny_models import tiny_causal_lm

        return tiny_causal_lm(**{"vocab_size": vocab_size, **(model_config or {})})
    if on_meta and any(Path(model).glob("*.safetensors")):
        return causal_lm_on_meta(model)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)


def model_dir(model: str) -> str:
    """The local directory of ``model`` (a built-in name is fetched and converted on first use)."""
    from lightrft_lightning import pretrained

    try:
        return pretrained.resolve(model)
    except ValueError as err:
        raise ValueError(f"{err}; or 'tiny'") from None


@dataclass
class Policy:
    """The actor to train.

    Args:
        model: ``"tiny"`` (random-init tiny Qwen2), a built-in name (``"smollm2-135m-instruct"``, fetched
            and converted on first use) or a local Hugging Face directory.
        tokenizer: ``"char"`` (built-in character tokenizer), a built-in model name or a local Hugging Face
            directory; None: ``"char"`` with ``model="tiny"``, else the model's own.
        tokenizer_chars: the characters of the ``"char"`` tokenizer.
        model_config: overrides of the tiny model's config (``hidden_size``, ``num_hidden_layers``...).
        lora: ``{r, alpha, dropout, target_modules}`` (``alpha`` defaults to ``r``, ``target_modules`` to
            the attention and MLP projections): train LoRA adapters of the actor (``peft``, the ``lora``
            extra) instead of all its weights. Only the adapters are trainable and in the optimizer; the
            KL reference is the same base with the adapters off (no second copy of the weights); the
            rollout engine gets the merged weights (base + ``alpha / r`` x the adapter product);
            checkpoints hold the adapters and their optimizer state, not the frozen base (rebuilt from
            ``model``); PPO's critic trains adapters of its own copy of the backbone, and its value head.
        gradient_checkpointing: recompute the actor's (and PPO's critic's) layer activations in the
            backward pass: less activation memory for a second forward of each layer.

    A pretrained actor without LoRA is built with its parameters on the meta device (``module.actor`` has
    its structure and config, no weights): the strategy gives it the checkpoint's weights at set-up, and
    FSDP2 shards it first, so that each rank reads only its own rows of the checkpoint.
    """

    model: str = "tiny"
    tokenizer: Optional[str] = None
    tokenizer_chars: Optional[str] = None
    model_config: Optional[dict[str, Any]] = None
    lora: Optional[dict[str, Any]] = None
    gradient_checkpointing: bool = False

    def check(self, owner: str) -> None:
        """Raise on a bad field, naming it as ``owner.field``."""
        if self.model_config and self.model != "tiny":
            raise ValueError(f"{owner}.model_config={self.model_config!r} is only for model='tiny'; accepted: None "
                             f"with model={self.model!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(f"{owner}.gradient_checkpointing={self.gradient_checkpointing!r} is invalid; "
                             "accepted: True or False")

    def build(self, reference: bool, owner: str) -> tuple[Any, nn.Module, Optional[nn.Module], Optional[LoRASettings]]:
        """The tokenizer, the actor, its frozen reference copy (with ``reference``, unless LoRA makes the
        actor's own base the reference) and the parsed LoRA settings."""
        path = self.model if self.model == "tiny" else model_dir(self.model)
        tokenizer = load_tokenizer(self.tokenizer or ("char" if self.model == "tiny" else path), self.tokenizer_chars)
        lora = LoRASettings.parse(self.lora, owner)
        actor = load_causal_lm(path, len(tokenizer), self.model_config, on_meta=lora is None)
        actor.generation_config.pad_token_id = tokenizer.pad_token_id
        actor.generation_config.eos_token_id = tokenizer.eos_token_id
        if lora is not None:
            apply_lora(actor, lora, owner)
        # a LoRA actor's reference is its own base (adapters off)
        ref = frozen_view(actor) if reference and lora is None else None
        if self.gradient_checkpointing:
            enable_gradient_checkpointing(actor)
        return tokenizer, actor, ref, lora


def frozen_view(model: nn.Module) -> nn.Module:
    """A frozen, eval-mode copy of ``model`` whose parameters share ``model``'s tensors: no second copy of
    the weights on every rank before the strategy shards them. FSDP2 shards and ZeRO partitions (and a
    DeepSpeed ZeRO-1/2 or bf16 engine's flat buffers) get storage of their own from the shared tensors;
    :func:`own_storage` copies what still shares (one process, or a ZeRO-0 fp32 engine training in place)
    before anything writes to it."""
    shared = {id(p): nn.Parameter(p.detach(), requires_grad=False) for p in model.parameters()}
    return copy.deepcopy(model, shared).eval()


def own_storage(model: nn.Module, source: nn.Module) -> int:
    """Give ``model``'s plain parameters that still share storage with ``source``'s a copy of their own;
    returns the bytes copied."""
    def storage(p: torch.Tensor) -> int:
        return 0 if is_sharded(p) or p.is_meta else p.untyped_storage().data_ptr()

    theirs = {storage(p) for p in source.parameters()} - {0}
    copied = 0
    for param in model.parameters():
        if storage(param) in theirs:
            param.data = param.data.clone()
            copied += param.numel() * param.element_size()
    return copied

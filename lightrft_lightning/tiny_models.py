"""Small random-init Hugging Face models built from a config in code (no hub needed), for tests,
examples and benchmarks."""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM


def tiny_qwen2_config(
    vocab_size: int = 64,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 64,
    max_position_embeddings: int = 256,
    **kwargs,
) -> Qwen2Config:
    """A Qwen2 config small enough to train on a CPU in seconds."""
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=kwargs.pop("tie_word_embeddings", False),
        **kwargs,
    )


def tiny_causal_lm(seed: int = 0, **config_kwargs) -> Qwen2ForCausalLM:
    """A fp32 ``Qwen2ForCausalLM`` with deterministic random weights (``seed``)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(tiny_qwen2_config(**config_kwargs))
    return model.float()

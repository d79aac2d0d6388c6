"""Per-token log-probs (and entropies) of a causal LM's tokens, computing only what a response mask needs."""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import Tensor, nn

from lightrft_lightning.algorithms.packing import SharedPromptBatch, pack_shared_prompts


def log_probs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, temperature: float = 1.0,
              entropy: bool = False, action_mask: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Log-probs of each next token under ``model`` (at the sampling ``temperature``), ``[N, L-1]``,
    and the entropy of each next-token distribution when asked. With ``action_mask`` (Hugging Face
    causal LMs) the forward does less, and only the positions it marks are meaningful (those before
    the first response are 0): rows it marks nowhere are not forwarded (their log-probs are 0), the
    samples of a prompt run as one packed sequence when that saves compute (the prompt forwarded
    once, every unmarked position 0; see :mod:`~lightrft_lightning.algorithms.packing`), and the LM
    head runs only from the first response position on (``logits_to_keep``: prompts hold most
    tokens, and the vocabulary projection is a large share of the forward)."""
    inner = _causal_lm(model) if action_mask is not None else None
    rows = action_mask.bool().any(1) if inner is not None else None
    if rows is not None and 0 < int(rows.sum()) < len(rows):
        logp, ent = log_probs(model, input_ids[rows], attention_mask[rows], temperature, entropy, action_mask[rows])
        shape = (input_ids.shape[0], input_ids.shape[1] - 1)
        logp = logp.new_zeros(shape).index_put((rows,), logp)
        return logp, ent.new_zeros(shape).index_put((rows,), ent) if ent is not None else None
    config = getattr(inner, "config", None)
    if getattr(config, "_attn_implementation", None) == "sdpa":
        packed = pack_shared_prompts(input_ids, action_mask, config)
        if packed is not None:
            return _packed_log_probs(model, packed, input_ids.shape, temperature, entropy)
    start = _first_action(action_mask) if inner is not None else 0
    keep = {"logits_to_keep": input_ids.shape[1] - start} if 0 < start < input_ids.shape[1] - 1 else {}
    start = start if keep else 0
    # no KV cache: nothing decodes from it (and checkpointed layers would refuse it)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **keep).logits[:, :-1]
    logp, ent = _token_log_probs(logits, input_ids[:, start + 1:], temperature, entropy)
    if start:
        logp = nn.functional.pad(logp, (start, 0))
        ent = nn.functional.pad(ent, (start, 0)) if ent is not None else None
    return logp, ent


def _packed_log_probs(model: nn.Module, packed: SharedPromptBatch, shape: torch.Size, temperature: float,
                      entropy: bool) -> tuple[Tensor, Optional[Tensor]]:
    start = packed.first_prediction
    width = packed.input_ids.shape[1]
    logits = model(input_ids=packed.input_ids, position_ids=packed.position_ids,
                   attention_mask=packed.attention_mask, use_cache=False, logits_to_keep=width - start).logits
    logp, ent = _token_log_probs(logits[packed.group, packed.position - start], packed.target, temperature, entropy)
    index = (packed.row, packed.column)
    logp = logp.new_zeros(shape[0], shape[1] - 1).index_put(index, logp)
    ent = ent.new_zeros(shape[0], shape[1] - 1).index_put(index, ent) if ent is not None else None
    return logp, ent


ENTROPY_CHUNK_ROWS = 1024  # positions per chunk of the entropy: one [rows, vocab] fp32 temporary at a time


def _token_log_probs(logits: Tensor, targets: Tensor, temperature: float,
                     entropy: bool) -> tuple[Tensor, Optional[Tensor]]:
    """The log-prob of each target under ``logits`` at the sampling temperature, and the entropy.

    ``logit[target] - logsumexp(logits)`` rather than a ``log_softmax`` over the vocabulary: no
    vocabulary-sized copy is kept besides the (fp32, temperature-scaled) logits, and the entropy,
    ``logsumexp - sum(softmax * logits)``, is taken in chunks of positions (it is a detached metric)."""
    logits = logits.float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logp = logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return logp, _entropy(logits.detach()) if entropy else None


@torch.no_grad()
def _entropy(logits: Tensor, chunk: int = ENTROPY_CHUNK_ROWS) -> Tensor:
    """The entropy of each row of ``logits`` (``[..., vocab]``), a chunk of rows at a time."""
    flat = logits.reshape(-1, logits.shape[-1])
    out = flat.new_empty(flat.shape[0])
    for start in range(0, flat.shape[0], chunk):
        rows = flat[start:start + chunk]
        lse = torch.logsumexp(rows, dim=-1)
        out[start:start + chunk] = lse - (torch.softmax(rows, dim=-1) * rows).sum(-1)
    return out.view(logits.shape[:-1])


def _first_action(action_mask: Tensor) -> int:
    """The first position any row of ``action_mask`` marks (its width when none does)."""
    used = action_mask.any(0).nonzero()
    return int(used[0]) if len(used) else action_mask.shape[1]


def _causal_lm(model: nn.Module) -> Optional[nn.Module]:
    """``model`` (a DeepSpeed engine's: its module) when its forward takes ``logits_to_keep``, as Hugging
    Face causal LMs do; else None."""
    inner = getattr(model, "module", None)
    target = inner if isinstance(inner, nn.Module) else model
    return target if "logits_to_keep" in inspect.signature(target.forward).parameters else None

"""Per-token log-probs (and entropies) of a causal LM's tokens, computing only what a response mask needs."""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightrft_lightning.algorithms.packing import SharedPromptBatch, pack_shared_prompts
from lightrft_lightning.parallel import ulysses


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
    hf = inner if inner is not None else _causal_lm(model)
    if hf is not None and ulysses.is_enabled(hf):
        return _sequence_parallel_log_probs(model, input_ids, attention_mask, temperature, entropy, action_mask,
                                            hf.config)
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


def _sequence_parallel_log_probs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, temperature: float,
                                 entropy: bool, action_mask: Optional[Tensor], config: object) -> tuple[Tensor, Optional[Tensor]]:
    """:func:`log_probs` with each sequence split over the sequence-parallel group (Ulysses; see
    :mod:`~lightrft_lightning.parallel.ulysses`): the forward (packed as in one process when that saves
    compute) runs on this rank's positions, each rank computes the log-probs its positions predict, and a
    sum over the group gives every rank all of them."""
    n, length = input_ids.shape
    packed = pack_shared_prompts(input_ids, action_mask, config) if action_mask is not None else None
    if packed is not None:
        ids, positions, mask = packed.input_ids, packed.position_ids, packed.attention_mask
        rows, predictors, targets, out = packed.group, packed.position, packed.target, (packed.row, packed.column)
    else:
        # right padding: a plain causal mask (no position before a row's end sees its padding), which the
        # attention hook hands to SDPA's causal kernels
        valid = torch.ones_like(attention_mask) if ulysses.is_right_padded(attention_mask) else attention_mask
        ids, mask = input_ids, ulysses.causal_mask(valid)
        positions = torch.arange(length, device=ids.device).expand(n, -1)
        rows = torch.arange(n, device=ids.device).repeat_interleave(length - 1)
        predictors = torch.arange(length - 1, device=ids.device).repeat(n)
        targets = input_ids[:, 1:].reshape(-1)
        out = (rows, predictors)
    shard = ulysses.shard_of(ids.shape[1])
    local_ids, local_positions, mask = ulysses.shard_inputs(ids, positions, mask, shard)
    logits = model(input_ids=local_ids, position_ids=local_positions, attention_mask=mask, use_cache=False).logits
    mine = ((predictors >= shard.start) & (predictors < shard.end)).nonzero(as_tuple=True)
    logp, ent = _token_log_probs(logits[rows[mine], predictors[mine] - shard.start], targets[mine], temperature, entropy)
    k = len(predictors)
    logp = ulysses.sum_over_group(logp.new_zeros(k).index_put(mine, logp))
    full = logp.new_zeros(n, length - 1).index_put(out, logp)
    if ent is None:
        return full, None
    ent = ulysses.sum_over_group(ent.new_zeros(k).index_put(mine, ent))
    return full, ent.new_zeros(n, length - 1).index_put(out, ent)


CHUNK_ROWS = 256  # positions per chunk: one [rows, vocab] fp32 temporary at a time


def _token_log_probs(logits: Tensor, targets: Tensor, temperature: float,
                     entropy: bool) -> tuple[Tensor, Optional[Tensor]]:
    """The log-prob of each target under ``logits`` at the sampling temperature (fp32), and the entropy.

    ``logit[target] / T - logsumexp(logits / T)`` a chunk of positions at a time, forward and backward
    (:class:`_TokenLogProb`): besides the logits and their gradient, no vocabulary-sized tensor is
    made (``log_softmax`` kept an fp32 copy for the backward, and the entropy took two more)."""
    scale = 1.0 / temperature if temperature > 0 else 1.0
    logp = _TokenLogProb.apply(logits, targets, scale)
    return logp, _entropy(logits.detach(), scale) if entropy else None


class _TokenLogProb(torch.autograd.Function):
    """``log_softmax(logits * scale)[target]`` in fp32, by chunks of positions; saves only the logits
    (no copy) and one log-sum-exp per position."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, targets: Tensor, scale: float) -> Tensor:
        flat, index = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1, 1)
        lse = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
        for start in range(0, flat.shape[0], CHUNK_ROWS):
            lse[start:start + CHUNK_ROWS] = torch.logsumexp(flat[start:start + CHUNK_ROWS].float() * scale, dim=-1)
        ctx.save_for_backward(logits, targets, lse)
        ctx.scale = scale
        return (flat.gather(1, index).squeeze(1).float() * scale - lse).view(targets.shape)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], None, None]:
        logits, targets, lse = ctx.saved_tensors
        flat, index = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1, 1)
        g = grad.reshape(-1, 1).float() * ctx.scale
        out = torch.empty_like(flat)
        for start in range(0, flat.shape[0], CHUNK_ROWS):
            rows = slice(start, start + CHUNK_ROWS)
            # d/dx (x_t * s - lse(x * s)) = s * (onehot(t) - softmax(x * s))
            part = torch.exp(flat[rows].float() * ctx.scale - lse[rows, None]).mul_(-g[rows])
            out[rows] = part.scatter_add_(1, index[rows], g[rows])
        return out.view_as(logits), None, None


@torch.no_grad()
def _entropy(logits: Tensor, scale: float = 1.0) -> Tensor:
    """The entropy of ``softmax(logits * scale)`` for each row of ``logits`` (``[..., vocab]``, fp32), a
    chunk of rows at a time."""
    flat = logits.reshape(-1, logits.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, flat.shape[0], CHUNK_ROWS):
        rows = flat[start:start + CHUNK_ROWS].float() * scale
        out[start:start + CHUNK_ROWS] = torch.logsumexp(rows, dim=-1) - (torch.softmax(rows, dim=-1) * rows).sum(-1)
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

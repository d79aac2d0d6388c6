"""Shared-prompt packing: the samples of one prompt as one sequence, so the prompt is forwarded once.

A rollout holds ``n_samples_per_prompt`` completions of each prompt, next to each other. Padded, each
row forwards its prompt again; packed, a group's row is ``prompt, response 1, response 2, ...`` with an
attention mask under which each response sees its prompt and its own earlier tokens only, and position
ids that continue each response from the end of its prompt: the same function of the same inputs, with
the prompt's tokens computed once and no padding inside a group. Gradients through the shared prompt
positions are the sum of what each sample's row would give.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor


@dataclass
class SharedPromptBatch:
    """A micro-batch as one row per prompt group, and where its predictions go in the ``[N, L-1]`` layout."""

    input_ids: Tensor  # [G, T]
    position_ids: Tensor  # [G, T]
    attention_mask: Tensor  # [G, 1, T, T] bool, True: may attend
    group: Tensor  # [K] the packed row of each response token's prediction
    position: Tensor  # [K] the position in that row whose logits predict it
    target: Tensor  # [K] the response token
    row: Tensor  # [K] where its log-prob goes in the padded layout: row and column
    column: Tensor

    @property
    def first_prediction(self) -> int:
        return int(self.position.min())


def pack_shared_prompts(input_ids: Tensor, action_mask: Tensor, config: Any) -> Optional[SharedPromptBatch]:
    """Pack the rows of ``input_ids`` (prompt + response, right-padded; ``action_mask[i, j]`` marks the
    prediction of token ``j + 1`` as a response token) that share a prompt with their neighbours.

    None when packing would not save compute under ``config`` (a Hugging Face model config: the
    attention a group's row adds against the prompt tokens it saves; a config without ``hidden_size``
    and ``num_attention_heads`` never packs), or when a row's response is empty or not one contiguous
    span (``log_probs.log_probs`` leaves rows without a response token out before packing).
    """
    mask = action_mask.detach().bool().cpu()
    ids = input_ids.detach().cpu()
    lengths = mask.sum(1).tolist()
    firsts = mask.int().argmax(1).tolist()
    groups: list[tuple[int, list[int]]] = []  # (prompt length, rows)
    for i, (length, first) in enumerate(zip(lengths, firsts)):
        if length == 0 or not bool(mask[i, first:first + length].all()):
            return None
        prompt = first + 1
        if groups and groups[-1][0] == prompt and torch.equal(ids[groups[-1][1][0], :prompt], ids[i, :prompt]):
            groups[-1][1].append(i)
        else:
            groups.append((prompt, [i]))
    row_lengths = [prompt + sum(lengths[i] for i in rows) for prompt, rows in groups]
    width = max(row_lengths)
    packed_cost, padded_cost = _cost(len(groups), width, config), _cost(ids.shape[0], ids.shape[1], config)
    if packed_cost is None or packed_cost >= padded_cost:
        return None
    packed = torch.zeros((len(groups), width), dtype=ids.dtype)
    positions = torch.zeros_like(packed)
    allowed = torch.eye(width, dtype=torch.bool).repeat(len(groups), 1, 1)  # padding sees itself only
    group, position, target, row, column = [], [], [], [], []
    for g, (prompt, rows) in enumerate(groups):
        packed[g, :prompt] = ids[rows[0], :prompt]
        positions[g, :prompt] = torch.arange(prompt)
        allowed[g, :prompt, :prompt] = torch.ones(prompt, prompt, dtype=torch.bool).tril()
        start = prompt
        for i in rows:
            n, end = lengths[i], start + lengths[i]
            packed[g, start:end] = ids[i, prompt:prompt + n]
            positions[g, start:end] = torch.arange(prompt, prompt + n)
            allowed[g, start:end, :prompt] = True
            allowed[g, start:end, start:end] = torch.ones(n, n, dtype=torch.bool).tril()
            group += [g] * n
            position += [prompt - 1, *range(start, end - 1)]  # the last prompt token predicts the first
            target.append(ids[i, prompt:prompt + n])
            row += [i] * n
            column += range(prompt - 1, prompt - 1 + n)
            start = end
    device = input_ids.device
    as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return SharedPromptBatch(packed.to(device), positions.to(device), allowed[:, None].to(device), as_tensor(group),
                             as_tensor(position), torch.cat(target).to(device), as_tensor(row), as_tensor(column))


def _cost(rows: int, width: int, config: Any) -> Optional[float]:
    """Multiply-adds of a decoder forward over ``rows`` x ``width`` tokens, up to a common factor: the
    projections per token and the attention per (query, key) pair, from a Llama-style config (None
    when it has no sizes to estimate from)."""
    hidden = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)
    if not hidden or not heads:
        return None
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    mlp = getattr(config, "intermediate_size", None) or 4 * hidden
    per_token = 2 * hidden * heads * head_dim + 2 * hidden * kv * head_dim + 3 * hidden * mlp
    per_pair = 2 * heads * head_dim
    return rows * width * per_token + rows * width * width * per_pair

"""Ulysses sequence parallelism as plain functions: the ``(dp, sp)`` device mesh, the sequence-parallel
group, splitting a sequence over it and gathering results back, and the attention hook.

Each rank of an sp group holds ``1/sp`` of every sequence's positions through the whole model. Only
attention needs the whole sequence: before it, an all-to-all trades the sequence shards of all heads
for the whole sequence of ``1/sp`` of the heads; after it, the reverse all-to-all gives each rank its
positions of every head back (DeepSpeed-Ulysses, arXiv:2309.14509). The hook is a function registered
in transformers' ``AttentionInterface`` under ``"ulysses_<base>"`` (``ulysses_sdpa``, ``ulysses_eager``)
that wraps the model's own implementation, so every model that dispatches attention through that
interface (Llama, Qwen2, Mistral, ...) is covered without replacing a ``forward``. It acts only when the
attention mask it is given covers more positions than the query holds (a sequence-sharded forward, see
:func:`shard_inputs`); any other forward (generation, a forward of the whole sequence) passes through.

Gradients: every rank of an sp group computes the same loss from the gathered per-token values
(:func:`sum_over_group`), and the backward of that gather sums the (identical) upstream gradients over
the group, i.e. ``sp x`` the gradient of this rank's positions. FSDP2 and DeepSpeed average parameter
gradients over all ``dp x sp`` ranks, so the average is the sum over each sp group of its positions'
gradients, averaged over dp: the gradient of the whole sequences, as in one process.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

PREFIX = "ulysses_"
_BASES = ("sdpa", "eager")
_GROUP: Optional[dist.ProcessGroup] = None


# ---------------------------------------------------------------------------------------------- mesh and group
def check_sp_size(world_size: int, sp_size: Any) -> None:
    """Refuse an ``sp_size`` that is not a positive divisor of ``world_size``."""
    if isinstance(sp_size, bool) or not isinstance(sp_size, int) or sp_size < 1 or world_size % sp_size:
        raise ValueError(f"StrategyConfig.sp_size={sp_size!r} is invalid for world_size={world_size}; accepted: a "
                         "positive divisor of the world size (ranks per sequence)")


def build_mesh(device_type: str, world_size: int, sp_size: int) -> DeviceMesh:
    """The ``("dp", "sp")`` mesh: ``sp_size`` consecutive ranks share each sequence, ``world_size // sp_size``
    such groups train on different data."""
    check_sp_size(world_size, sp_size)
    return init_device_mesh(device_type, (world_size // sp_size, sp_size), mesh_dim_names=("dp", "sp"))


def set_group(group: Optional[dist.ProcessGroup]) -> None:
    """Make ``group`` the process's sequence-parallel group (None: no sequence parallelism)."""
    global _GROUP
    _GROUP = group


def get_group() -> Optional[dist.ProcessGroup]:
    """The sequence-parallel group, or None."""
    return _GROUP


def group_size(group: Optional[dist.ProcessGroup] = None) -> int:
    group = group if group is not None else _GROUP
    return dist.get_world_size(group) if group is not None else 1


# ---------------------------------------------------------------------------------------------- data
class SequenceParallelData:
    """LightRFT's ``SPDataProcessor``: ``preprocess(items)`` gathers the lists of the sp group's ranks (in
    rank order) so that every rank of the group holds the same items; ``postprocess(items)`` keeps this
    rank's share (the ``i``-th of ``sp`` equal slices). With no group (``sp_size`` 1) both return their input."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None) -> None:
        self.group = group
        self.sp_size = group_size(group) if group is not None else 1
        self.sp_rank = dist.get_rank(group) if group is not None else 0

    def preprocess(self, data: Any) -> Any:
        if self.sp_size == 1:
            return data
        gathered: list[Any] = [None] * self.sp_size
        dist.all_gather_object(gathered, list(data), group=self.group)
        return [item for part in gathered for item in part]

    def postprocess(self, data: Any) -> Any:
        if self.sp_size == 1:
            return data
        if len(data) % self.sp_size:
            raise ValueError(f"sp_data_processor.postprocess: {len(data)} items do not split over sp_size="
                             f"{self.sp_size} ranks; accepted: a multiple of sp_size items")
        share = len(data) // self.sp_size
        return data[self.sp_rank * share:(self.sp_rank + 1) * share]


# ---------------------------------------------------------------------------------------------- collectives
class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` of a 1-D tensor with split sizes; the backward is the reverse exchange."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup, out_splits: list[int], in_splits: list[int]) -> Tensor:
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        out = x.new_empty(sum(out_splits))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        return _AllToAll.apply(grad.contiguous(), ctx.group, ctx.in_splits, ctx.out_splits), None, None, None


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sum_over_group(x: Tensor, group: Optional[dist.ProcessGroup] = None) -> Tensor:
    """The sum of ``x`` over the sp group, differentiable (each rank contributes the entries of its own
    positions, zeros elsewhere). Its backward sums the upstream gradients over the group (see the module
    docstring for why that is the right scale under FSDP2 and DeepSpeed)."""
    group = group if group is not None else _GROUP
    if group is None or group_size(group) == 1:
        return x
    if x.requires_grad:
        return _AllReduceSum.apply(x, group)
    out = x.clone()
    dist.all_reduce(out, group=group)
    return out


def head_splits(heads: int, sp: int) -> list[int]:
    """Heads per rank: as even as possible (9 heads on 2 ranks: 5 and 4)."""
    return [heads // sp + (r < heads % sp) for r in range(sp)]


def sequence_to_heads(x: Tensor, group: dist.ProcessGroup, splits: list[int]) -> Tensor:
    """``[B, H, S/sp, D]`` (this rank's positions, all heads) -> ``[B, h, S, D]`` (all positions of this
    rank's ``h = splits[rank]`` heads)."""
    sp, rank = group_size(group), dist.get_rank(group)
    b, _, s_local, d = x.shape
    mine = splits[rank]
    flat = x.permute(1, 0, 2, 3).reshape(-1)
    unit = b * s_local * d
    out = _AllToAll.apply(flat, group, [mine * unit] * sp, [h * unit for h in splits])
    return out.view(sp, mine, b, s_local, d).permute(2, 1, 0, 3, 4).reshape(b, mine, sp * s_local, d)


def heads_to_sequence(y: Tensor, group: dist.ProcessGroup, splits: list[int]) -> Tensor:
    """``[B, S, h, D]`` (an attention output: all positions of this rank's heads) -> ``[B, S/sp, H, D]``."""
    sp = group_size(group)
    b, s, mine, d = y.shape
    s_local = s // sp
    flat = y.reshape(b, sp, s_local, mine, d).permute(1, 0, 2, 3, 4).reshape(-1)
    unit = b * s_local * d
    out = _AllToAll.apply(flat, group, [h * unit for h in splits], [mine * unit] * sp)
    parts = out.split([h * unit for h in splits])
    return torch.cat([p.view(b, s_local, h, d) for p, h in zip(parts, splits)], dim=2)


# ---------------------------------------------------------------------------------------------- inputs
@dataclass
class SequenceShard:
    """This rank's positions ``[start, end)`` of sequences of ``length`` positions padded to ``padded``."""

    length: int
    padded: int
    start: int
    end: int


def shard_of(length: int, group: Optional[dist.ProcessGroup] = None) -> SequenceShard:
    group = group if group is not None else _GROUP
    sp = group_size(group)
    rank = dist.get_rank(group) if group is not None else 0
    padded = -(-length // sp) * sp
    size = padded // sp
    return SequenceShard(length, padded, rank * size, (rank + 1) * size)


def causal_mask(attention_mask: Tensor) -> Tensor:
    """``[B, 1, L, L]`` bool (True: may attend) from a ``[B, L]`` padding mask: causal, valid keys only,
    and every position sees itself (so that a padding row is never empty)."""
    length = attention_mask.shape[1]
    mask = _tril(length, attention_mask.device)[None] & attention_mask.bool()[:, None, :]
    return (mask | torch.eye(length, dtype=torch.bool, device=mask.device))[:, None]


def shard_inputs(input_ids: Tensor, position_ids: Tensor, mask: Tensor,
                 shard: SequenceShard) -> tuple[Tensor, Tensor, Tensor]:
    """This rank's ``input_ids`` and ``position_ids`` (``[B, end - start]``) and the whole ``[B, 1, P, P]``
    bool mask, all padded to ``shard.padded`` positions (a padding position sees every position up to itself,
    and no other position sees it: a causal mask stays causal)."""
    pad = shard.padded - shard.length
    if pad:
        input_ids = torch.nn.functional.pad(input_ids, (0, pad))
        position_ids = torch.nn.functional.pad(position_ids, (0, pad))
        mask = torch.nn.functional.pad(mask, (0, pad, 0, pad))
        mask[:, :, shard.length:] = _tril(shard.padded, mask.device)[shard.length:]
    return input_ids[:, shard.start:shard.end], position_ids[:, shard.start:shard.end], mask


def _tril(length: int, device: Any) -> Tensor:
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


_CAUSAL_SEEN: list[Any] = [None, False]  # (a weak reference to the last mask checked, whether it is plain causal)


def _is_plain_causal(mask: Tensor) -> bool:
    """Whether a ``[B, 1, P, P]`` bool mask is the plain causal one (remembered for the last mask object seen:
    every layer of a forward gets the same one)."""
    ref, causal = _CAUSAL_SEEN
    if ref is None or ref() is not mask:
        causal = mask.dtype == torch.bool and bool(torch.equal(mask, _tril(mask.shape[-1], mask.device).expand_as(mask)))
        _CAUSAL_SEEN[:] = [weakref.ref(mask), causal]
    return causal


def is_right_padded(attention_mask: Tensor) -> bool:
    """Whether every row of a ``[B, L]`` padding mask is its tokens then padding (no left padding, no holes)."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def gather_sequence(x: Tensor, shard: SequenceShard, dim: int = 1, group: Optional[dist.ProcessGroup] = None) -> Tensor:
    """The whole sequence (``shard.length`` positions along ``dim``) from each rank's ``[.., end - start, ..]``
    part, differentiable as :func:`sum_over_group`."""
    before = x.new_zeros(*x.shape[:dim], shard.start, *x.shape[dim + 1:])
    after = x.new_zeros(*x.shape[:dim], shard.padded - shard.end, *x.shape[dim + 1:])
    full = torch.cat([before, x, after], dim=dim)
    return sum_over_group(full, group).narrow(dim, 0, shard.length)


# ---------------------------------------------------------------------------------------------- attention
class _Groups:
    """An attention module seen with another ``num_key_value_groups`` (key/value heads already repeated)."""

    def __init__(self, module: Any, groups: int) -> None:
        self._module, self.num_key_value_groups = module, groups

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def _repeat_heads(x: Tensor, times: int) -> Tensor:
    return x if times == 1 else x.repeat_interleave(times, dim=1)


def _ulysses_attention(base: str) -> Callable:
    def attention(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                  **kwargs: Any) -> tuple[Tensor, Any]:
        inner = _base_attention(base)
        group = _GROUP
        if group is None or attention_mask is None or attention_mask.shape[-2] == query.shape[2]:
            return inner(module, query, key, value, attention_mask, **kwargs)
        sp = group_size(group)
        heads, kv_heads = query.shape[1], key.shape[1]
        if heads % sp or kv_heads % sp:
            # heads that do not split evenly (SmolLM2-135M: 9 query and 3 key/value heads on 2 ranks): repeat the
            # key/value heads to one per query head, then split the heads unevenly
            key, value = _repeat_heads(key, heads // kv_heads), _repeat_heads(value, heads // kv_heads)
            module = _Groups(module, 1)
        q_splits, kv_splits = head_splits(heads, sp), head_splits(key.shape[1], sp)
        query = sequence_to_heads(query, group, q_splits)
        key = sequence_to_heads(key, group, kv_splits)
        value = sequence_to_heads(value, group, kv_splits)
        mask = attention_mask
        if base == "sdpa" and _is_plain_causal(mask):
            # no explicit mask: SDPA's causal kernels (flash on CPU too) instead of a [S, S] score matrix per head
            mask = None
        elif base == "eager" and mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(query.dtype).min)
        out, _ = inner(module, query, key, value, mask, **kwargs)
        return heads_to_sequence(out, group, q_splits), None

    return attention


def _base_attention(base: str) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base == "eager":
        from transformers.models.llama.modeling_llama import eager_attention_forward

        return eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base]


def register() -> None:
    """Register ``ulysses_sdpa`` and ``ulysses_eager`` with transformers' attention and mask interfaces (the
    mask functions are the base's, so a forward that is not sequence-sharded gets the usual mask)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    for base in _BASES:
        if PREFIX + base not in AttentionInterface._global_mapping:
            AttentionInterface.register(PREFIX + base, _ulysses_attention(base))
            AttentionMaskInterface.register(PREFIX + base, ALL_MASK_ATTENTION_FUNCTIONS[base])


def enable(model: Any) -> bool:
    """Switch a Hugging Face model's attention to its Ulysses wrapper; returns False for a model without a
    ``config._attn_implementation`` (not a transformers model: left alone). Raises for an implementation
    the wrapper does not cover."""
    config = getattr(model, "config", None)
    base = getattr(config, "_attn_implementation", None)
    if base is None:
        return False
    if base.startswith(PREFIX):
        return True
    if base not in _BASES:
        raise ValueError(f"sequence parallelism (sp_size > 1): attention implementation {base!r} of "
                         f"{type(model).__name__} is not supported; accepted: {', '.join(map(repr, _BASES))} "
                         "(flash attention's variable-length path is not wrapped yet)")
    register()
    model.set_attn_implementation(PREFIX + base)
    return True


def is_enabled(model: Any) -> bool:
    base = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return bool(base) and base.startswith(PREFIX) and _GROUP is not None and group_size() > 1

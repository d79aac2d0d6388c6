"""Ulysses on 2 ranks (sp 2, dp 1) against one process on the whole sequence: logits, loss and gradients of
tiny Llama and Qwen2 models with right padding (and a length that does not split evenly), the packed
shared-prompt path of ``log_probs``, head counts that do not split over the ranks, eager attention.

    torchrun --nproc_per_node=2 tests/scripts/ulysses_equivalence.py
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from launch import report  # noqa: E402

from lightrft_lightning.algorithms.log_probs import log_probs  # noqa: E402
from lightrft_lightning.parallel import ulysses  # noqa: E402
from lightrft_lightning.tiny_models import tiny_causal_lm  # noqa: E402


def tiny_llama(heads: int = 4, kv_heads: int = 2, attn: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=36 if heads == 3 else 32, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=64,
                         max_position_embeddings=256, attn_implementation=attn)
    return LlamaForCausalLM(config).float()


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """3 rows of 13 positions (odd: the shards need padding), right-padded to lengths 13, 9 and 6; the
    first two share a 4-token prompt (packable)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (3, 13), generator=g)
    ids[1, :4] = ids[0, :4]
    attn = torch.zeros_like(ids)
    for i, n in enumerate((13, 9, 6)):
        attn[i, :n] = 1
    ids = ids * attn
    action = torch.zeros(3, 12)
    action[0, 3:12], action[1, 3:8] = 1, 1  # responses after the 4-token prompt
    action[2, 2:5] = 1
    return ids, attn, action


def grads(model: torch.nn.Module, world_mean: bool) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        g = p.grad.detach().clone()
        if world_mean:  # what FSDP2 / DeepSpeed do with gradients: the mean over all ranks
            dist.all_reduce(g)
            g /= dist.get_world_size()
        out[name] = g
    return out


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def check(name: str, model: torch.nn.Module) -> dict[str, float]:
    ids, attn, action = batch()
    valid = attn.bool()
    # one process, the whole sequence
    ref_model = copy.deepcopy(model)
    logits_ref = ref_model(input_ids=ids, attention_mask=attn, use_cache=False).logits
    ce = torch.nn.functional.cross_entropy(logits_ref[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    loss_ref = (ce * valid[:, 1:]).sum() / valid[:, 1:].sum()
    loss_ref.backward()
    grads_ref = grads(ref_model, False)
    ref_model.zero_grad()
    logp_ref, ent_ref = log_probs(ref_model, ids, attn, 0.7, entropy=True, action_mask=action)
    (logp_ref * action).sum().backward()
    lp_grads_ref = grads(ref_model, False)

    # 2 ranks, each holding half of every sequence
    assert ulysses.enable(model)
    shard = ulysses.shard_of(ids.shape[1])
    positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    local_ids, local_pos, mask = ulysses.shard_inputs(ids, positions, ulysses.causal_mask(attn), shard)
    local_logits = model(input_ids=local_ids, position_ids=local_pos, attention_mask=mask, use_cache=False).logits
    logits = ulysses.gather_sequence(local_logits, shard)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    loss = (ce * valid[:, 1:]).sum() / valid[:, 1:].sum()
    loss.backward()
    grads_sp = grads(model, True)
    model.zero_grad()
    logp, ent = log_probs(model, ids, attn, 0.7, entropy=True, action_mask=action)
    (logp * action).sum().backward()
    lp_grads = grads(model, True)
    unpacked, _ = log_probs(model, ids, attn, 0.7, action_mask=None)  # no mask: every position, not packed
    m = action.bool()
    return {
        f"{name}/logits": float((logits - logits_ref)[valid].abs().max()),
        f"{name}/loss": abs(float(loss - loss_ref)),
        f"{name}/grads": max_diff(grads_sp, grads_ref),
        f"{name}/log_probs": float((logp - logp_ref)[m].abs().max()),
        f"{name}/entropy": float((ent - ent_ref)[m].abs().max()),
        f"{name}/log_prob_grads": max_diff(lp_grads, lp_grads_ref),
        f"{name}/log_probs_unpacked": float((unpacked - logp_ref)[m].abs().max()),
    }


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mesh = ulysses.build_mesh("cpu", dist.get_world_size(), dist.get_world_size())
    ulysses.set_group(mesh["sp"].get_group())
    results: dict[str, float] = {}
    results.update(check("llama", tiny_llama()))
    results.update(check("qwen2", tiny_causal_lm(seed=0)))
    results.update(check("llama_3_heads_1_kv", tiny_llama(heads=3, kv_heads=1)))
    results.update(check("llama_eager", tiny_llama(attn="eager")))
    # LightRFT's sp_data_processor: preprocess gathers the group's items in rank order, postprocess keeps a share
    sp = ulysses.SequenceParallelData(ulysses.get_group())
    rank = dist.get_rank()
    gathered = sp.preprocess([f"r{rank}a", f"r{rank}b"])
    ok = gathered == ["r0a", "r0b", "r1a", "r1b"] and sp.postprocess(gathered) == [f"r{rank}a", f"r{rank}b"]
    results["sp_data_processor/mismatch"] = 0.0 if ok else 1.0
    report(results)


if __name__ == "__main__":
    main()

"""``RLModule.log_probs`` with an action mask runs the LM head only from the first response position
on, and gives the log-probs and entropies of the full computation there."""

from __future__ import annotations

import torch

from lightrft_lightning.algorithms import GRPO
from lightrft_lightning.tiny_models import tiny_causal_lm


def test_log_probs_from_the_first_response_position_equal_the_full_computation():
    module = GRPO(tokenizer_chars="0123456789", model_config={"hidden_size": 32}, temperature=0.7)
    model = tiny_causal_lm(seed=0, vocab_size=16, tie_word_embeddings=True).eval()
    ids = torch.randint(0, 16, (3, 12), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    attn[2, 10:] = 0  # a shorter row, right-padded
    mask = torch.zeros(3, 11)
    mask[0, 5:11], mask[1, 7:11], mask[2, 6:9] = 1, 1, 1  # responses start at 5, 7 and 6
    rows: list[int] = []
    hook = model.lm_head.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[1]))
    with torch.no_grad():
        full, full_ent = module.log_probs(model, ids, attn, entropy=True)
        part, part_ent = module.log_probs(model, ids, attn, entropy=True, action_mask=mask)
    hook.remove()
    assert rows == [12, 12 - 5]  # the head saw every position, then only those from the first response on
    assert part.shape == full.shape == (3, 11)
    torch.testing.assert_close(part[:, 5:], full[:, 5:], rtol=0, atol=1e-6)
    torch.testing.assert_close(part_ent[:, 5:], full_ent[:, 5:], rtol=0, atol=1e-6)
    assert (part[:, :5] == 0).all() and (part_ent[:, :5] == 0).all()


def _group_rollout(prompt_lengths: list[int], response_lengths: list[list[int]], vocab: int = 16, seed: int = 0):
    """Right-padded prompt+response rows, each prompt's samples next to each other, and their response mask."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for p, lengths in zip(prompt_lengths, response_lengths):
        prompt = torch.randint(0, vocab, (p,), generator=gen)
        rows += [(p, torch.cat([prompt, torch.randint(0, vocab, (n,), generator=gen)])) for n in lengths]
    width = max(len(r) for _, r in rows)
    ids, attn, mask = torch.zeros(len(rows), width, dtype=torch.long), torch.zeros(len(rows), width), torch.zeros(len(rows), width - 1)
    for i, (p, r) in enumerate(rows):
        ids[i, :len(r)], attn[i, :len(r)], mask[i, p - 1:len(r) - 1] = r, 1, 1
    return ids, attn.long(), mask


def _forward_rows(model) -> tuple[list[tuple[int, ...]], object]:
    shapes: list[tuple[int, ...]] = []
    hook = model.model.embed_tokens.register_forward_hook(lambda mod, args, out: shapes.append(tuple(args[0].shape)))
    return shapes, hook


def _masked_against_full(module, model, ids, attn, mask, zero, atol: float) -> list[tuple[int, ...]]:
    """``log_probs`` with ``mask`` against the full computation: equal log-probs, entropies and
    gradients of ``(logp * mask).sum()`` on the masked positions, 0 where ``zero`` marks. Returns the
    shapes each forward ran."""
    shapes, hook = _forward_rows(model)
    logp, ent = module.log_probs(model, ids, attn, entropy=True, action_mask=mask)
    (logp * mask).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    full, full_ent = module.log_probs(model, ids, attn, entropy=True)
    (full * mask).sum().backward()
    hook.remove()
    on = mask.bool()
    torch.testing.assert_close(logp[on], full[on], rtol=0, atol=atol)
    torch.testing.assert_close(ent[on], full_ent[on], rtol=0, atol=atol)
    assert (logp[zero] == 0).all() and (ent[zero] == 0).all()
    for got, want in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    return shapes


def test_the_samples_of_a_prompt_run_as_one_packed_row_with_the_same_log_probs_and_gradients():
    module = GRPO(tokenizer_chars="0123456789", temperature=0.7)
    model = tiny_causal_lm(seed=0, vocab_size=16, tie_word_embeddings=True).eval()
    ids, attn, mask = _group_rollout([9, 12], [[3, 7, 1, 5], [6, 2, 4, 8]])
    mask[5] = 0  # a sample left out of the loss (dynamic sampling): not forwarded at all
    shapes = _masked_against_full(module, model, ids, attn, mask, ~mask.bool(), atol=1e-5)
    # two rows: prompt 9 + 16 response tokens, prompt 12 + 6 + 4 + 8 (the masked sample's 2 left out)
    assert shapes == [(2, 30), (8, 20)]


def test_packing_is_skipped_when_it_would_cost_more_than_it_saves():
    module = GRPO(tokenizer_chars="0123456789")
    model = tiny_causal_lm(seed=0, vocab_size=16, hidden_size=32, intermediate_size=64).eval()
    # a 2-token prompt and long responses: one packed row's attention over 4 x 60 tokens costs more
    # than the 6 prompt tokens it saves
    ids, attn, mask = _group_rollout([2], [[60, 60, 60, 60]])
    shapes, hook = _forward_rows(model)
    with torch.no_grad():
        logp, _ = module.log_probs(model, ids, attn, action_mask=mask)
        full, _ = module.log_probs(model, ids, attn)
    hook.remove()
    assert shapes == [(4, 62), (4, 62)]
    torch.testing.assert_close(logp[mask.bool()], full[mask.bool()], rtol=0, atol=1e-6)


def test_a_config_without_sizes_or_a_split_response_is_not_packed():
    from types import SimpleNamespace

    from lightrft_lightning.algorithms.packing import pack_shared_prompts

    ids, _, mask = _group_rollout([5], [[4, 4]])
    config = SimpleNamespace(hidden_size=32, num_attention_heads=2, intermediate_size=64)
    assert pack_shared_prompts(ids, mask, config).input_ids.shape == (1, 13)
    assert pack_shared_prompts(ids, mask, SimpleNamespace()) is None  # nothing to estimate the cost from
    mask[0, 5] = 0  # a response with a hole: not one span
    assert pack_shared_prompts(ids, mask, config) is None


def test_rows_without_a_response_token_are_not_forwarded():
    module = GRPO(tokenizer_chars="0123456789")
    model = tiny_causal_lm(seed=0, vocab_size=16, hidden_size=32, intermediate_size=64).eval()
    ids, attn, mask = _group_rollout([2], [[60, 60, 50, 60]])  # not packed (as above)
    mask[1] = 0
    assert _masked_against_full(module, model, ids, attn, mask, 1, atol=1e-6) == [(3, 62), (4, 62)]  # row 1: 0


def test_chunked_log_probs_and_entropy_equal_log_softmax_forward_and_backward(monkeypatch):
    """Gather minus logsumexp, by chunks of positions (3 here, so rows span chunks), against log_softmax:
    the same log-probs, entropies and gradients, at temperature 0.7 and 1 (greedy: 0 scores at 1), for fp32
    and bf16 logits (bf16: the gradient comes back in bf16, computed in fp32)."""
    import lightrft_lightning.algorithms.log_probs as lp

    monkeypatch.setattr(lp, "CHUNK_ROWS", 3)
    gen = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        for temperature in (0.7, 1.0, 0.0):
            base = (torch.randn(2, 5, 50, generator=gen) * 4).to(dtype)
            targets = torch.randint(50, (2, 5), generator=gen)
            weights = torch.randn(2, 5, generator=gen)
            got_in, ref_in = base.clone().requires_grad_(), base.clone().requires_grad_()
            got, ent = lp._token_log_probs(got_in, targets, temperature, entropy=True)
            scaled = ref_in.float() / (temperature if temperature > 0 else 1.0)
            ref_all = torch.log_softmax(scaled, -1)
            ref = ref_all.gather(-1, targets[..., None])[..., 0]
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ent, -(ref_all.exp() * ref_all).sum(-1).detach(), atol=1e-4, rtol=1e-4)
            (got * weights).sum().backward()
            (ref * weights).sum().backward()
            assert got_in.grad.dtype == dtype
            torch.testing.assert_close(got_in.grad.float(), ref_in.grad.float(), atol=tol, rtol=tol)

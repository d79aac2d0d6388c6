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

"""Advantage, KL and loss functions against hand-computed values; rewards, tokenizer and prompt data."""

from __future__ import annotations

import math

import pytest
import torch

from lightrft_lightning.algorithms import (CombinedReward, RewardModel, aggregate, compute_advantages, gae,
                                           group_norm, kl_penalty, load_function, policy_loss, rloo, value_loss)
from lightrft_lightning.algorithms.losses import kl_loss
from lightrft_lightning.data import PromptDataModule, PromptDataset
from lightrft_lightning.sampler import ResumableSampler
from lightrft_lightning.tasks import counting_prompts, counting_reward
from lightrft_lightning.tokenizer import char_tokenizer, load_tokenizer

close = lambda a, b: torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32),  # noqa: E731
                                                torch.as_tensor(b, dtype=torch.float32), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- advantage estimators
def test_group_norm_and_dr_grpo():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    s = 0.5 / math.sqrt(1 / 3)  # deviation 0.5 over the unbiased std sqrt(1/3)
    close(group_norm(rewards, 4), [s, -s, -s, s, 0, 0, 0, 0])
    close(group_norm(rewards, 4, std_normalize=False), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    mask = torch.ones(8, 3)
    adv, _ = compute_advantages("dr_grpo", rewards, mask, 4)
    close(adv[:, 0], [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    close(adv, adv[:, :1].expand(8, 3))


def test_rloo():
    close(rloo(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4), [2 / 3, -2 / 3, -2 / 3, 2 / 3])
    with pytest.raises(ValueError, match="n_samples_per_prompt >= 2"):
        rloo(torch.tensor([1.0]), 1)


def test_reinforce_plus_plus_with_and_without_baseline():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv, returns = compute_advantages("reinforce++", torch.tensor([1.0, 0.0]), mask, 1)
    close(returns, [[1, 1, 0], [0, 0, 0]])  # the reward sits on the last response token, summed backwards
    std = math.sqrt(0.3)  # values 1,1,0,0,0: mean 0.4, unbiased variance 0.3
    close(adv, [[0.6 / std, 0.6 / std, 0], [-0.4 / std] * 3])
    adv, returns = compute_advantages("reinforce++_baseline", torch.tensor([1.0, 0.0]), mask, 2)
    close(returns, [[0.5, 0.5, 0], [-0.5, -0.5, -0.5]])
    close(adv, [[0.6 / std, 0.6 / std, 0], [-0.4 / std] * 3])


def test_gae_by_hand():
    rewards, values, mask = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.8]]), torch.ones(1, 2)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(adv, [[0.5, 0.2]])
    close(ret, [[1.0, 1.0]])
    adv, _ = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    close(adv, [[0.22 + 0.45 * 0.2, 0.2]])
    # padding after the response contributes nothing
    adv_padded, _ = gae(torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[0.5, 0.8, 7.0]]),
                        torch.tensor([[1.0, 1.0, 0.0]]), gamma=1.0, lam=1.0)
    close(adv_padded, [[0.5, 0.2, 0.0]])


def test_kl_in_reward_for_group_and_token_estimators():
    mask = torch.ones(2, 2)
    kl = torch.tensor([[0.5, 0.5], [0.0, 0.0]])
    adv, _ = compute_advantages("dr_grpo", torch.tensor([1.0, 1.0]), mask, 2, kl=kl, kl_coef=1.0)
    close(adv[:, 0], [-0.5, 0.5])  # rewards 1-1 and 1-0 -> group mean 0.5
    _, ret = compute_advantages("reinforce++", torch.tensor([1.0, 1.0]), mask, 1, kl=kl, kl_coef=1.0)
    close(ret, [[0.0, 0.5], [1.0, 1.0]])


def test_kl_estimators():
    logp, ref = torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25]))
    ln2 = math.log(2)
    close(kl_penalty(logp, ref, "k1"), [ln2])
    close(kl_penalty(logp, ref, "k2"), [0.5 * ln2**2])
    close(kl_penalty(logp, ref, "k3"), [0.5 - 1 + ln2])
    close(kl_penalty(ref, ref, "k3"), [0.0])
    with pytest.raises(ValueError, match="accepted: k1, k2, k3"):
        kl_penalty(logp, ref, "k4")
    close(kl_loss(logp[None], ref[None], torch.ones(1, 1), "k2"), 0.5 * ln2**2)


def test_bad_estimator_names_the_accepted_values():
    with pytest.raises(ValueError, match="advantage_estimator='ppo'.*group_norm"):
        compute_advantages("ppo", torch.ones(2), torch.ones(2, 1), 2)
    with pytest.raises(ValueError, match="needs values"):
        compute_advantages("gae", torch.ones(2), torch.ones(2, 1), 1)


# ---------------------------------------------------------------- losses
def test_policy_loss_clips_on_both_sides():
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.5]])
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, frac = policy_loss(torch.log(ratio), torch.zeros(1, 4), adv, torch.ones(1, 4), 0.2, 0.2)
    # clipped high (1.2), clipped low (-0.8), unclipped (0.5), unclipped (-1.5)
    close(loss, (-1.2 + 0.8 - 0.5 + 1.5) / 4)
    close(frac, 0.5)


def test_policy_loss_ignores_the_log_probs_outside_the_mask():
    # a row left out of the forward has log-probs 0 against its rollout's: no overflow into the loss
    logp = torch.tensor([[-0.5, 0.0]], requires_grad=True)
    loss, frac = policy_loss(logp, torch.tensor([[-0.4, -200.0]]), torch.tensor([[1.0, 0.0]]),
                             torch.tensor([[1.0, 0.0]]), 0.2, 0.2)
    close(loss, -math.exp(-0.1))
    loss.backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 1] == 0
    close(frac, 0.0)


def test_clip_higher_is_separate_from_clip_lower():
    logp = torch.log(torch.tensor([[1.25]]))
    close(policy_loss(logp, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2, 0.2)[0], -1.2)
    loss, frac = policy_loss(logp, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2, 0.28)
    close(loss, -1.25)
    close(frac, 0.0)
    # a lower clip of 0.5 lets a negative-advantage ratio of 0.6 through unclipped
    low = torch.log(torch.tensor([[0.6]]))
    close(policy_loss(low, torch.zeros(1, 1), -torch.ones(1, 1), torch.ones(1, 1), 0.2, 0.2)[0], 0.8)
    close(policy_loss(low, torch.zeros(1, 1), -torch.ones(1, 1), torch.ones(1, 1), 0.5, 0.2)[0], 0.6)


def test_token_sequence_and_constant_aggregation():
    loss = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    close(aggregate(loss, mask, "token"), 2.0)
    close(aggregate(loss, mask, "token", num_tokens=6), 1.0)
    close(aggregate(loss, mask, "sequence"), 2.25)
    close(aggregate(loss, mask, "constant", max_len=4), 0.75)
    close(aggregate(loss, mask, "constant"), 1.0)
    with pytest.raises(ValueError, match="loss_agg='mean' is invalid; accepted: token, sequence, constant"):
        aggregate(loss, mask, "mean")


def test_value_loss_clipping():
    v, old, ret, m = torch.tensor([[1.0]]), torch.tensor([[0.5]]), torch.tensor([[2.0]]), torch.ones(1, 1)
    close(value_loss(v, old, ret, m, clip=0.2), 0.5 * 1.69)  # clipped value 0.7 is further from the return
    close(value_loss(v, old, ret, m, clip=None), 0.5)
    close(value_loss(torch.tensor([[3.0]]), torch.tensor([[2.9]]), ret, m, clip=0.2), 0.5)


# ---------------------------------------------------------------- rewards
def test_rule_reward_by_import_path_and_weights():
    rows = counting_prompts(4, seed=1)
    fn = load_function("lightrft_lightning.tasks:counting_reward")
    assert fn is counting_reward
    prompts, answers = [r["prompt"] for r in rows], [r["answer"] for r in rows]
    completions = [answers[0], answers[1][:2] + "xx", "", answers[3][::-1]]
    meta = [{"answer": a} for a in answers]
    expected = torch.tensor(counting_reward(prompts, completions, meta))
    assert expected[0] == 1.0 and expected[1] == 0.5 and expected[2] == 0.0
    combined = CombinedReward({"lightrft_lightning.tasks:counting_reward": 2.0,
                               "lightrft_lightning.algorithms.rewards:exact_match": 0.5})
    close(combined(prompts, completions, meta), 2 * expected + 0.5 * torch.tensor([1.0, 0, 0, 0]))
    with pytest.raises(ValueError, match="'package.module:function'"):
        CombinedReward({"no_colon": 1.0})
    with pytest.raises(ValueError, match="cannot be imported"):
        load_function("lightrft_lightning.tasks:nope")


def test_reward_model_from_a_local_directory(tmp_path):
    from transformers import Qwen2ForSequenceClassification

    from lightrft_lightning.tiny_models import tiny_qwen2_config

    tok = char_tokenizer()
    torch.manual_seed(0)
    rm = Qwen2ForSequenceClassification(tiny_qwen2_config(vocab_size=len(tok), num_labels=1,
                                                          pad_token_id=tok.pad_token_id))
    rm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    prompts, completions = ["12", "7"], ["34", "8901"]
    combined = CombinedReward({str(tmp_path): 3.0})
    assert len(combined.models) == 1
    with torch.no_grad():
        direct = torch.stack([rm(**tok(p + c, return_tensors="pt")).logits[0, 0] for p, c in zip(prompts, completions)])
    close(combined(prompts, completions), 3 * direct)  # padded batch scores the last real token
    assert isinstance(combined.fns[0], RewardModel)


# ---------------------------------------------------------------- tokenizer and data
def test_char_tokenizer_round_trip_and_local_directory(tmp_path):
    tok = char_tokenizer()
    ids = tok("12+3=", add_special_tokens=False).input_ids
    assert len(ids) == 5 and tok.decode(ids) == "12+3="
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == "12+3="
    assert tok(["1", "123"], padding=True).input_ids[0][:2] == [tok.pad_token_id] * 2  # left padding
    tok.save_pretrained(tmp_path)
    assert load_tokenizer(str(tmp_path))("12+3=").input_ids == ids
    with pytest.raises(ValueError, match=r"neither 'char', a built-in model name \(smollm2-135m-instruct\) nor a local directory"):
        load_tokenizer(str(tmp_path / "missing"))


def test_prompt_dataset_from_jsonl_and_errors(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"question": "1+1", "answer": "2"}\n\n{"question": "2+2", "answer": "4"}\n')
    ds = PromptDataset.from_jsonl(str(path), prompt_key="question")
    assert len(ds) == 2 and ds[1] == {"prompt": "2+2", "answer": "4", "index": 1}
    with pytest.raises(ValueError, match="no string field 'prompt'"):
        PromptDataset.from_jsonl(str(path))
    path.write_text('{"prompt": "x"}\nnot json\n')
    with pytest.raises(ValueError, match="p.jsonl:2: not valid JSON"):
        PromptDataset.from_jsonl(str(path))
    with pytest.raises(ValueError, match="exactly one of path"):
        PromptDataModule()


def test_sampler_resumes_where_it_stopped_and_splits_ranks():
    ds = PromptDataset([str(i) for i in range(20)])
    full = list(ResumableSampler(ds, batch_size=3, seed=7))
    assert len(full) == 18 and sorted(full) != full and len(set(full)) == 18
    resumed = ResumableSampler(ds, batch_size=3, seed=7)
    resumed.load_state_dict({"epoch": 0, "consumed": 6, "seed": 7})
    assert list(resumed) == full[6:] and len(resumed) == 18
    resumed.set_epoch(1)
    assert resumed.consumed == 0 and list(resumed) != full
    ranks = [list(ResumableSampler(ds, batch_size=3, num_replicas=2, rank=r, seed=7)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 9 and not set(ranks[0]) & set(ranks[1])
    assert ranks[0][:3] + ranks[1][:3] != full[:6] and set(ranks[0][:3] + ranks[1][:3]) == set(full[:6])
    with pytest.raises(ValueError, match="same seed"):
        ResumableSampler(ds, batch_size=3, seed=8).load_state_dict({"epoch": 0, "consumed": 6, "seed": 7})

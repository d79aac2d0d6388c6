"""The off-policy correction (TIS, MIS at token, sequence and geometric level), GSPO and the mismatch
metrics as pure functions, against values computed by hand, and the loss object's settings."""

from __future__ import annotations

import math

import pytest
import torch

from lightrft_lightning.algorithms.experience import Experience
from lightrft_lightning.algorithms.grpo import GRPOLoss
from lightrft_lightning.algorithms.losses import ClippedPolicyLoss, policy_loss, rollout_correction


def close(got, want, tol=1e-6):
    assert torch.allclose(torch.as_tensor(got, dtype=torch.float32), torch.as_tensor(want, dtype=torch.float32),
                          atol=tol, rtol=tol), (got, want)


def test_token_tis_caps_each_token_ratio_and_counts_what_it_truncated():
    old = torch.tensor([[-1.0, -1.0, -2.0]])
    mu = torch.tensor([[-1.5, -0.5, -2.0]])  # ratios e^0.5, e^-0.5, 1
    w, m = rollout_correction(old, mu, torch.ones(1, 3), is_level="token", is_threshold=1.5)
    close(w, [[1.5, math.exp(-0.5), 1.0]])
    close(m["logp_abs_diff"], 1.0 / 3)
    close(m["ratio_max"], math.exp(0.5))
    # k3 estimate of KL(mu || pi_old): r - 1 - log r with r = pi_old / mu, averaged over the tokens
    close(m["kl"], (math.expm1(0.5) - 0.5 + math.expm1(-0.5) + 0.5) / 3)
    close(m["tokens_truncated"], 1 / 3)
    close(m["seqs_truncated"], 1.0)
    assert "tokens_masked" not in m


def test_mu_far_below_pi_old_gives_a_capped_weight_or_a_dropped_token_never_inf_or_nan():
    old = torch.tensor([[-0.1, -0.2]])
    mu = torch.tensor([[-200.0, -0.2]])  # the engine almost never samples what the learner likes
    w, m = rollout_correction(old, mu, torch.ones(1, 2), is_level="token", is_threshold=2.0)
    close(w, [[2.0, 1.0]])
    assert m["ratio_max"] == pytest.approx(math.exp(20.0), rel=1e-5)  # the log-ratio is clamped at 20
    w, m = rollout_correction(old, mu, torch.ones(1, 2), rs_level="token", rs_threshold=2.0)
    close(w, [[0.0, 1.0]])
    close(m["tokens_masked"], 0.5)
    for level in ("sequence", "geometric"):
        w, _ = rollout_correction(old, mu, torch.ones(1, 2), is_level=level, is_threshold=3.0)
        close(w, [[3.0, 3.0]])
    loss, _ = policy_loss(old, old, torch.ones(1, 2), torch.ones(1, 2), weights=w)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(-3.0)


def test_sequence_level_takes_the_product_and_geometric_the_mean_of_the_token_ratios():
    old = torch.tensor([[0.3, 0.4], [0.1, 9.0]])
    mu = torch.zeros(2, 2)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # row 1's second position is padding (ignored)
    w, m = rollout_correction(old, mu, mask, is_level="sequence", is_threshold=2.0)
    close(w, [[2.0, 2.0], [math.exp(0.1), 0.0]])  # e^0.7 = 2.01 capped, for both of its tokens
    close(m["tokens_truncated"], 2 / 3)
    close(m["seqs_truncated"], 0.5)
    close(m["ratio_max"], math.exp(0.4))
    w, m = rollout_correction(old, mu, mask, is_level="geometric", is_threshold=2.0)
    close(w, [[math.exp(0.35), math.exp(0.35)], [math.exp(0.1), 0.0]])
    assert m["tokens_truncated"] == 0


def test_mis_drops_what_leaves_the_range_and_tis_and_mis_combine():
    old = torch.log(torch.tensor([[2.5, 1.0, 0.3], [1.2, 1.1, 1.0]]))
    mu = torch.zeros(2, 3)
    mask = torch.ones(2, 3)
    w, m = rollout_correction(old, mu, mask, rs_level="token", rs_threshold=2.0, rs_threshold_lower=0.5)
    close(w, [[0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    close(m["tokens_masked"], 2 / 6)
    close(m["seqs_masked"], 0.5)
    # the default lower bound is 1 / upper: 0.3 < 1/3 is dropped, 1/2.5 = 0.4 would be kept
    w, _ = rollout_correction(old, mu, mask, rs_level="token", rs_threshold=2.5)
    close(w[0], [1.0, 1.0, 0.0])
    # sequence-level: row 0's product 0.75 is inside [0.5, 2], row 1's 1.32 too; geometric the same rows
    w, m = rollout_correction(old, mu, mask, rs_level="sequence", rs_threshold=1.3, rs_threshold_lower=0.5)
    close(w, [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    close(m["seqs_masked"], 0.5)
    # TIS and MIS together: the kept tokens carry their (capped) ratio (IcePop = token TIS + token MIS)
    w, m = rollout_correction(old, mu, mask, is_level="token", is_threshold=1.15, rs_level="token", rs_threshold=2.0,
                              rs_threshold_lower=0.5)
    close(w, [[0.0, 1.0, 0.0], [1.15, 1.1, 1.0]])
    close(m["tokens_truncated"], 2 / 6)  # 2.5 and 1.2 were above the cap (2.5 was also dropped)


def test_an_empty_response_and_one_token_sequences():
    old = torch.tensor([[-0.5, 0.0], [-1.0, -3.0]])
    mu = torch.tensor([[-1.5, 0.0], [-3.0, -3.0]])
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # one token, and an empty response
    for level in ("token", "sequence", "geometric"):  # one token: the three levels agree
        w, m = rollout_correction(old, mu, mask, is_level=level, is_threshold=2.0, rs_level=level, rs_threshold=3.0)
        close(w, [[2.0, 0.0], [0.0, 0.0]])
        close(m["logp_abs_diff"], 1.0)  # over the one response token
        close(m["seqs_truncated"], 1.0)  # of the one non-empty sequence
        close(m["tokens_masked"], 0.0)
    w, m = rollout_correction(old, mu, torch.zeros(2, 2), is_level="sequence")
    close(w, torch.zeros(2, 2))
    assert all(v == 0 for v in m.values())  # nothing to measure, nothing divided by 0
    loss, frac = policy_loss(old, old, torch.ones(2, 2), torch.zeros(2, 2), policy_loss_type="gspo", weights=w)
    assert loss.item() == 0 and frac.item() == 0


def test_gspo_clips_one_length_normalized_ratio_per_sequence():
    old = torch.zeros(1, 2)
    adv, mask = torch.ones(1, 2), torch.ones(1, 2)
    # log-ratios 0.2 and 0.4: GSPO's ratio e^0.3 = 1.35 is above 1 + 0.2, so both tokens are clipped at 1.2
    logp = torch.tensor([[0.2, 0.4]], requires_grad=True)
    loss, frac = policy_loss(logp, old, adv, mask, 0.2, 0.2, policy_loss_type="gspo")
    close(loss, -1.2)
    close(frac, 1.0)
    loss.backward()
    close(logp.grad, [[0.0, 0.0]])
    # inside the range the loss is -ratio (every token carries it): d/d logp_t = -ratio / |y| = -0.5
    logp = torch.tensor([[0.05, -0.05]], requires_grad=True)
    loss, frac = policy_loss(logp, old, adv, mask, 0.2, 0.2, policy_loss_type="gspo")
    close(loss, -1.0)
    loss.backward()
    close(logp.grad, [[-0.5, -0.5]])
    # the token ratios of PPO instead: each token its own e^lr
    close(policy_loss(logp.detach(), old, adv, mask, 0.2, 0.2)[0], -(math.exp(0.05) + math.exp(-0.05)) / 2)
    # one-token sequences: GSPO is PPO
    one = torch.tensor([[0.1], [-0.3]])
    close(policy_loss(one, torch.zeros(2, 1), torch.tensor([[1.0], [-1.0]]), torch.ones(2, 1), 0.2, 0.2, "sequence",
                      policy_loss_type="gspo")[0],
          policy_loss(one, torch.zeros(2, 1), torch.tensor([[1.0], [-1.0]]), torch.ones(2, 1), 0.2, 0.2, "sequence")[0])


def test_the_loss_object_weights_the_policy_term_and_reports_the_mismatch():
    logp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    mb = Experience(input_ids=torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 3),
                    action_mask=torch.ones(1, 2), advantages=torch.ones(1, 2),
                    rollout_logp=torch.tensor([[-2.0, -1.0]]))
    plain, metrics = GRPOLoss()(logp, mb, mb.action_mask)
    close(plain, -1.0)  # old_logp = logp detached (on-policy): ratio 1, no weights
    assert metrics["mismatch/logp_abs_diff"] == pytest.approx(0.5)
    assert metrics["mismatch/ratio_max"] == pytest.approx(math.e)
    assert "mismatch/tokens_truncated" not in metrics
    tis, metrics = GRPOLoss(rollout_is="token", rollout_is_threshold=2.0)(logp, mb, mb.action_mask)
    close(tis, -(2.0 + 1.0) / 2)  # e = 2.72 capped at 2
    assert metrics["mismatch/tokens_truncated"] == pytest.approx(0.5)
    mis, metrics = GRPOLoss(rollout_rs="token")(logp, mb, mb.action_mask)
    close(mis, -(0.0 + 1.0) / 2)  # e leaves [1/2, 2]: dropped, still counted in the token mean
    assert metrics["mismatch/seqs_masked"] == 1.0
    with pytest.raises(ValueError, match="rollout_is='token'.*Experience.rollout_logp"):
        mb.rollout_logp = None
        GRPOLoss(rollout_is="token")(logp, mb, mb.action_mask)


@pytest.mark.parametrize("kwargs, match", [
    ({"rollout_is": "tokens"}, r"rollout_is='tokens' is invalid; accepted: None, token, sequence, geometric"),
    ({"policy_loss_type": "grpo"}, r"policy_loss_type='grpo' is invalid; accepted: ppo, gspo"),
    ({"rollout_is_threshold": 5.0}, r"rollout_is_threshold=5.0 is only used with rollout_is set"),
    ({"rollout_rs_threshold_lower": 0.1}, r"rollout_rs_threshold_lower=0.1 is only used with rollout_rs set"),
    ({"rollout_is": "token", "rollout_is_threshold": 0}, r"rollout_is_threshold=0 is invalid; accepted: a number > 0"),
    ({"rollout_rs": "sequence", "rollout_rs_threshold": 2.0, "rollout_rs_threshold_lower": 3.0},
     r"rollout_rs_threshold_lower=3.0 is above rollout_rs_threshold=2.0"),
])
def test_bad_correction_settings_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClippedPolicyLoss(**kwargs).check("GRPO")


def test_ppo_takes_the_same_correction_and_gspo_settings():
    from lightrft_lightning.algorithms.ppo import PPOLoss

    logp = torch.tensor([[-1.0, -1.0]])
    mb = Experience(input_ids=torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 3),
                    action_mask=torch.ones(1, 2), advantages=torch.tensor([[1.0, -0.5]]),
                    old_logp=torch.tensor([[-1.1, -0.9]]), rollout_logp=torch.tensor([[-2.0, -1.0]]))
    settings = dict(policy_loss_type="gspo", rollout_is="token", rollout_is_threshold=1.5)
    ppo, ppo_metrics = PPOLoss(**settings)(logp, mb, mb.action_mask)
    grpo, grpo_metrics = GRPOLoss(**settings)(logp, mb, mb.action_mask)
    close(ppo, grpo)
    assert ppo_metrics == grpo_metrics and ppo_metrics["mismatch/tokens_truncated"] == 0.5

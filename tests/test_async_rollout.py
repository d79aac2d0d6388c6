"""Asynchronous rollouts (AsyncRollout) without a server: max_off_policy_steps=0 is the synchronous step
exactly, and off-policy a colocated engine is refused before any training. The asynchronous pipeline itself
runs against real vLLM servers in tests/vllm/test_async_training.py."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightrft_lightning.algorithms import GRPO, AsyncRollout, Rollout
from tests.test_refill import data, fit, params

torch.set_num_threads(1)
TINY = dict(tokenizer_chars="0123456789", model_config={"hidden_size": 32}, n_samples_per_prompt=2, max_new_tokens=4,
            micro_train_batch_size=4, actor_learning_rate=1e-2)


def grpo(rollout: Rollout) -> GRPO:
    module = GRPO(**TINY)
    module.rollout = rollout
    rollout.bind(module.tokenizer)
    return module


def test_zero_steps_off_policy_is_synchronous_grpo_exactly():
    runs = []
    for rollout in (Rollout(n_samples_per_prompt=2, max_new_tokens=4),
                    AsyncRollout(max_off_policy_steps=0, n_samples_per_prompt=2, max_new_tokens=4)):
        pl.seed_everything(0, verbose=False)
        module = grpo(rollout)
        _, metrics = fit(module, data(), 3)
        runs.append((metrics, params(module.actor)))
    (sync_metrics, sync_params), (async_metrics, async_params) = runs
    assert [m["loss/policy"] for m in sync_metrics] == [m["loss/policy"] for m in async_metrics]
    assert [m["reward"] for m in sync_metrics] == [m["reward"] for m in async_metrics]
    assert sync_params.keys() == async_params.keys()
    assert all(torch.equal(sync_params[k], async_params[k]) for k in sync_params)
    assert not any(k.startswith("staleness/") for k in async_metrics[0])


def test_off_policy_refuses_a_colocated_engine_and_turns_the_correction_on():
    pl.seed_everything(0, verbose=False)
    module = GRPO(max_off_policy_steps=1, **TINY)
    assert isinstance(module.rollout, AsyncRollout) and module.loss.rollout_is == "token"
    with pytest.raises(ValueError, match="max_off_policy_steps=1.*HFEngine.*engine_type='vllm_server'"):
        fit(module, data(), 1)
    with pytest.raises(ValueError, match="max_off_policy_steps=-1 is invalid"):
        GRPO(max_off_policy_steps=-1, **TINY)
    with pytest.raises(ValueError, match="max_off_policy_steps=2 with dynamic_sampling_mode='refill'"):
        GRPO(max_off_policy_steps=2, dynamic_sampling=True, dynamic_sampling_mode="refill", **TINY)
    with pytest.raises(ValueError, match="in_flight='later' is invalid; accepted: 'finish', 'keep', 'abort'"):
        GRPO(max_off_policy_steps=1, in_flight="later", **TINY)
    with pytest.raises(ValueError, match="in_flight='keep' is only used by an asynchronous rollout"):
        GRPO(in_flight="keep", **TINY)
    with pytest.raises(ValueError, match="in_flight='abort' is only used by an asynchronous rollout"):
        AsyncRollout(max_off_policy_steps=0, in_flight="abort").check("AsyncRollout")

"""HFEngine generation and lifecycle, and bucketed weight streaming from a plain module."""

from __future__ import annotations

import pytest
import torch

from lightrft_lightning.engines import EngineStateError, HFEngine, SamplingParams, iter_weight_buckets, push_weights
from lightrft_lightning.engines.weight_sync import hf_name, plan_buckets
from lightrft_lightning.tiny_models import tiny_causal_lm

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
EOS = 3


@pytest.fixture(scope="module")
def actor():
    return tiny_causal_lm(seed=0)


def engine_for(model, **kw):
    return HFEngine(model, pad_token_id=0, eos_token_id=EOS, **kw)


def test_same_seed_same_tokens_other_seed_other_tokens(actor):
    engine = engine_for(actor)
    params = SamplingParams(n=2, max_new_tokens=12, seed=7, stop_at_eos=False)
    a, b = engine.generate(PROMPTS, params), engine.generate(PROMPTS, params)
    c = engine.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=12, seed=8, stop_at_eos=False))
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def test_n_samples_grouped_by_prompt_and_distinct(actor):
    out = engine_for(actor).generate(PROMPTS, SamplingParams(n=4, max_new_tokens=10, seed=0, stop_at_eos=False))
    assert [c.prompt_index for c in out] == [0] * 4 + [1] * 4 + [2] * 4
    assert all(len(c.token_ids) == len(c.logprobs) == 10 and c.finish_reason == "length" for c in out)
    assert len({tuple(c.token_ids) for c in out[:4]}) > 1  # the samples of one prompt differ


def test_each_prompt_is_prefilled_once_for_its_samples(actor):
    engine = engine_for(actor)
    rows: list[tuple[int, ...]] = []
    hook = engine.model.model.embed_tokens.register_forward_hook(lambda m, args, out: rows.append(tuple(args[0].shape)))
    greedy = engine.generate(PROMPTS, SamplingParams(n=3, temperature=0, max_new_tokens=5, stop_at_eos=False))
    hook.remove()
    assert rows == [(3, 4)] + [(9, 1)] * 4  # 3 prompts (left-padded to 4) once, then 9 samples per token
    alone = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=5, stop_at_eos=False))
    for i, c in enumerate(greedy):  # each sample continues its own prompt's cache
        assert c.prompt_index == i // 3 and c.token_ids == alone[i // 3].token_ids
        assert max(abs(x - y) for x, y in zip(c.logprobs, alone[i // 3].logprobs)) < 1e-5


def test_left_padding_gives_the_tokens_and_logprobs_of_unpadded_generation(actor):
    engine = engine_for(actor)
    greedy = SamplingParams(temperature=0, max_new_tokens=8, stop_at_eos=False)
    batch = engine.generate(PROMPTS, greedy)
    for prompt, got in zip(PROMPTS, batch):
        alone = engine.generate([prompt], greedy)[0]
        assert got.token_ids == alone.token_ids
        assert max(abs(x - y) for x, y in zip(got.logprobs, alone.logprobs)) < 1e-5
    # and equal to transformers' own greedy decoding
    ref = actor.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, len(PROMPTS[0]):].tolist()
    assert batch[0].token_ids == ref


def test_logprobs_equal_the_actors(actor):
    out = engine_for(actor).generate(PROMPTS[:1], SamplingParams(max_new_tokens=6, seed=1, stop_at_eos=False))[0]
    seq = torch.tensor([PROMPTS[0] + out.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(actor(seq).logits[0, len(PROMPTS[0]) - 1:-1].float(), -1)
    expected = logp.gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(out.logprobs), expected, atol=1e-5)


def test_stops_at_eos_and_includes_it(actor):
    engine = engine_for(actor)
    free = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=8, stop_at_eos=False))
    # make the third greedy token of prompt 0 the EOS: it must end there, with finish_reason "eos"
    stop_engine = HFEngine(actor, pad_token_id=0, eos_token_id=free[0].token_ids[2])
    out = stop_engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=8))
    first = free[0].token_ids.index(free[0].token_ids[2])
    assert out[0].token_ids == free[0].token_ids[: first + 1] and out[0].finish_reason == "eos"
    assert len(out[0].logprobs) == first + 1
    for got, ref in zip(out[1:], free[1:]):  # other rows are unaffected by row 0 finishing early
        stop = next((i for i, t in enumerate(ref.token_ids) if t == free[0].token_ids[2]), None)
        assert got.token_ids == (ref.token_ids if stop is None else ref.token_ids[: stop + 1])


def test_top_k_one_is_greedy(actor):
    engine = engine_for(actor)
    greedy = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=6, stop_at_eos=False))
    topk = engine.generate(PROMPTS, SamplingParams(temperature=1.0, top_k=1, max_new_tokens=6, seed=3, stop_at_eos=False))
    tiny_p = engine.generate(PROMPTS, SamplingParams(top_p=1e-6, max_new_tokens=6, seed=3, stop_at_eos=False))
    assert [c.token_ids for c in greedy] == [c.token_ids for c in topk] == [c.token_ids for c in tiny_p]


def test_engine_owns_its_copy(actor):
    engine = engine_for(actor)
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(engine.model.parameters(), actor.parameters()))
    assert not any(p.requires_grad for p in engine.model.parameters())


def test_shared_weights_are_the_actors_own_and_a_push_of_them_copies_nothing():
    actor = tiny_causal_lm(seed=0, tie_word_embeddings=True)
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    engine = engine_for(actor, share_weights=True, sleep_level=2)
    assert {p.data_ptr() for p in engine.model.parameters()} == {p.data_ptr() for p in actor.parameters()}
    assert engine.model.lm_head.weight is engine.model.model.embed_tokens.weight  # still tied
    assert not any(p.requires_grad for p in engine.model.parameters()) and all(p.requires_grad for p in actor.parameters())
    with torch.no_grad():
        actor.model.embed_tokens.weight.mul_(1.5)  # an optimizer step, in place
    push_weights(actor, engine, bucket_bytes=1 << 20)
    assert engine.generate(PROMPTS, params) == engine_for(actor).generate(PROMPTS, params)
    engine.sleep()  # level 2 drops the engine's references, not the actor's weights
    assert all(p.numel() > 0 for p in actor.parameters())
    engine.wake_up()
    push_weights(actor, engine, bucket_bytes=1 << 20)  # fills fresh tensors: a copy from here on
    assert engine.generate(PROMPTS, params) == engine_for(actor).generate(PROMPTS, params)
    with pytest.raises(ValueError, match=r"share_weights=True\): the model.s weights are not all on meta"):
        engine_for(actor, share_weights=True, device="meta")


def test_sleep_level_1_keeps_weights_level_2_requires_a_complete_push(actor):
    params = SamplingParams(max_new_tokens=6, seed=0)
    engine = engine_for(actor, sleep_level=1)
    before = engine.generate(PROMPTS, params)
    engine.sleep()
    assert engine.is_sleeping and engine.weights_survive_sleep
    with pytest.raises(EngineStateError, match="asleep"):
        engine.generate(PROMPTS, params)
    engine.wake_up(["weights"])
    assert engine.is_sleeping  # the KV cache still sleeps
    engine.wake_up(["kv_cache"])
    assert engine.generate(PROMPTS, params) == before

    engine = engine_for(actor, sleep_level=2)
    assert not engine.weights_survive_sleep
    engine.sleep()
    assert all(p.numel() == 0 for p in engine.model.parameters())  # the memory is really gone
    with pytest.raises(EngineStateError, match="weights are asleep"):
        engine.update_weights(actor.named_parameters())
    engine.wake_up()
    with pytest.raises(EngineStateError, match="no valid weights"):
        engine.generate(PROMPTS, params)
    named = list(actor.named_parameters())
    engine.update_weights(named[:-1], last_bucket=False)
    engine.update_weights(named[-1:])
    assert engine.generate(PROMPTS, params) == before


def test_partial_push_is_refused_with_the_missing_names(actor):
    engine = HFEngine.from_config(actor.config, pad_token_id=0, eos_token_id=EOS)
    assert not engine.weights_valid and len(engine.missing_weights()) == len(list(actor.parameters()))
    named = list(actor.named_parameters())
    engine.update_weights(named[1:])
    assert engine.missing_weights() == [named[0][0]]
    with pytest.raises(EngineStateError, match="no valid weights"):
        engine.generate(PROMPTS, SamplingParams())


def test_bad_inputs_are_named(actor):
    engine = engine_for(actor)
    with pytest.raises(ValueError, match="unknown parameter 'nope'"):
        engine.update_weights([("nope", torch.zeros(1))])
    with pytest.raises(ValueError, match="has shape"):
        engine.update_weights([("lm_head.weight", torch.zeros(2, 2))])
    with pytest.raises(ValueError, match="sleep_level=3"):
        engine.sleep(3)
    with pytest.raises(ValueError, match="tags"):
        engine.wake_up(["cuda_graph"])
    with pytest.raises(ValueError, match="prompt_token_ids"):
        engine.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="SamplingParams.top_k"):
        SamplingParams(top_k=0)


def test_from_config_after_push_matches_actor_logits(actor):
    engine = HFEngine.from_config(actor.config, pad_token_id=0, eos_token_id=EOS)
    nbytes = push_weights(actor, engine, bucket_bytes=4096)
    assert nbytes == sum(p.numel() * 4 for p in actor.parameters())
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        assert (engine.model(ids).logits - actor(ids).logits).abs().max() <= 1e-6


def test_buckets_respect_the_budget_and_cover_every_parameter(actor):
    budget = 3000
    seen = {}
    for bucket in iter_weight_buckets(actor, budget):
        size = sum(t.numel() * t.element_size() for _, t in bucket)
        assert size <= budget or len(bucket) == 1  # only a parameter larger than the budget travels alone
        seen.update((name, t.clone()) for name, t in bucket)
    reference = dict(actor.named_parameters())
    assert seen.keys() == reference.keys()
    assert all(torch.equal(seen[k], reference[k]) for k in seen)
    assert len(plan_buckets(actor, budget)) > 3


def test_buckets_cast_to_the_requested_dtype(actor):
    for bucket in iter_weight_buckets(actor, 1 << 20, dtype=torch.bfloat16):
        assert all(t.dtype == torch.bfloat16 for _, t in bucket)
    engine = HFEngine(tiny_causal_lm(seed=1).to(torch.bfloat16), pad_token_id=0)
    nbytes = push_weights(actor, engine, 1 << 20, dtype=engine.dtype)
    assert nbytes == sum(p.numel() * 2 for p in actor.parameters())
    for (name, p), q in zip(actor.named_parameters(), engine.model.parameters()):
        assert torch.equal(p.to(torch.bfloat16), q), name


def test_wrapper_prefixes_are_stripped():
    assert hf_name("module._orig_mod.model.layers.0._checkpoint_wrapped_module.mlp.weight") == "model.layers.0.mlp.weight"
    with pytest.raises(ValueError, match="bucket_bytes=0"):
        plan_buckets(torch.nn.Linear(2, 2), 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sleep_frees_gpu_memory_and_wake_restores(actor):
    params = SamplingParams(max_new_tokens=6, seed=0)
    for level in (1, 2):
        engine = engine_for(actor, device="cuda", sleep_level=level)
        before = engine.generate(PROMPTS, params)
        used = torch.cuda.memory_allocated()
        engine.sleep()
        assert torch.cuda.memory_allocated() < used
        engine.wake_up(["weights"])
        if level == 2:
            push_weights(actor, engine, bucket_bytes=8192)
        engine.wake_up(["kv_cache"])
        assert engine.generate(PROMPTS, params) == before

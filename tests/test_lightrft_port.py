"""LightRFT code ports by changing the import: LightRFT's constructors, attributes, config fields and
strategy calls (the ★ items of the API note), and a LightRFT-style training script run on the fake
strategy in-process and on FSDP2 / DeepSpeed ZeRO-2 / ZeRO-3 on 2 gloo ranks, with equal numbers;
``_build_multimodal_inputs``; ``trainer.init_module(empty_init=True)`` on every strategy; and the ported
example ``examples/lightrft_style/train_grpo.py`` (tiny model) on the fake strategy and on 2 ranks."""

from __future__ import annotations

import argparse
import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from lightrft_lightning import (FakeStrategy, LightRFTFake, StrategyConfig, get_fake_strategy, get_strategy,
                                is_actor, is_engine)
from lightrft_lightning.tiny_models import tiny_causal_lm
from tests.launch import script_result, torchrun

torch.set_num_threads(1)
SCRIPTS = Path(__file__).parent / "scripts"


def _script():
    spec = importlib.util.spec_from_file_location("lightrft_port_train", SCRIPTS / "lightrft_port_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


port = _script()


# ---------------------------------------------------------------- construction and attributes
def test_fake_strategy_lightrft_constructor_and_attributes():
    s = FakeStrategy(seed=42, max_norm=1.0, micro_train_batch_size=2, train_batch_size=8, args=None)
    assert (s.seed, s.max_norm, s.micro_train_batch_size, s.train_batch_size) == (42, 1.0, 2, 8)
    assert s.config.max_norm == 1.0 and s.world_size == 1 and s.accumulated_gradient == 4
    assert s.inference_engine is None and s.engine_mp_group is None and s.engine_dp_group is None
    items = [object(), object()]
    assert s.sp_data_processor.preprocess(items) is items and s.sp_data_processor.postprocess(items) is items
    with pytest.raises(ValueError, match="sp_size=2 is refused; accepted: 1. The fake strategy is one process"):
        FakeStrategy(args=argparse.Namespace(sp_size=2))
    with pytest.raises(ValueError, match="StrategyConfig.sp_size=0 is invalid"):
        FakeStrategy(args=argparse.Namespace(sp_size=0))
    # the constructor values win over args (one source of truth: strategy.max_norm is config.max_norm)
    args = argparse.Namespace(seed=1, max_norm=0.0, train_batch_size=16, micro_train_batch_size=4, my_flag="x")
    s = FakeStrategy(seed=3, max_norm=0.5, args=args)
    assert (s.seed, s.max_norm, s.train_batch_size, s.micro_train_batch_size) == (3, 0.5, 16, 4)
    assert s.args is args and s.config.get_extra_arg("my_flag") == "x"
    s.max_norm = 2.0  # settable, validated
    assert s.config.max_norm == 2.0
    with pytest.raises(ValueError, match="max_norm"):
        s.max_norm = -1.0
    with pytest.raises(TypeError, match="keywords"):
        FakeStrategy(42, 1.0)
    with pytest.raises(TypeError, match="config= and args="):
        FakeStrategy(StrategyConfig(), args=args)
    g = get_fake_strategy(args)
    assert isinstance(g, LightRFTFake) and g.args is args and g.train_batch_size == 16
    # the Lightning way keeps working
    assert LightRFTFake(StrategyConfig(train_batch_size=8, micro_train_batch_size=2)).accumulated_gradient == 4


def test_fsdp_and_deepspeed_lightrft_constructors():
    from lightrft_lightning import DeepspeedStrategy, FSDPV2Strategy, LightRFTFSDP

    args = argparse.Namespace(fsdp=True, train_batch_size=8, micro_train_batch_size=2, l2=0.1)
    f = FSDPV2Strategy(seed=5, max_norm=0.3, micro_train_batch_size=1, train_batch_size=4, bf16=False, args=args)
    assert (f.seed, f.max_norm, f.micro_train_batch_size, f.train_batch_size, f.bf16) == (5, 0.3, 1, 4, False)
    assert f.config.l2 == 0.1 and f.args is args
    assert LightRFTFSDP(StrategyConfig(fsdp=True, shard_size=2)).config.shard_size == 2
    d = DeepspeedStrategy(seed=5, max_norm=0.0, micro_train_batch_size=1, train_batch_size=4, zero_stage=3,
                          bf16=False, args=args)
    assert d.stage == 3 and d.zero_stage == 3 and d.bf16 is False and d.is_rlhf is False
    train_cfg, eval_cfg = d.get_ds_train_config(is_actor=True), d.get_ds_eval_config(offload=True)
    assert train_cfg["zero_optimization"]["stage"] == 3 and train_cfg["train_micro_batch_size_per_gpu"] == 1
    assert train_cfg["gradient_clipping"] == 0.0 and "bf16" not in train_cfg
    assert eval_cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    with pytest.raises(ValueError, match=r"offload=True\) needs ZeRO-3"):
        DeepspeedStrategy(zero_stage=2, args=args).get_ds_eval_config(offload=True)
    assert isinstance(get_strategy(args), FSDPV2Strategy)


# ---------------------------------------------------------------- config fields and estimators
def test_config_reads_the_fields_lightrft_trainers_read():
    args = argparse.Namespace(advantage_clip=0.5, reward_clip=3.0, advantages_norm=True, dynamic_sampling=True,
                              overlong_buffer=True, overlong_buffer_len=64, overlong_buffer_penalty_factor=2.0,
                              reward_running_norm=True, reward_running_norm_minus_mean=True,
                              micro_rollout_batch_size=4, advantage_estimator="reinforce_baseline")
    c = StrategyConfig.from_args(args)
    for name, value in vars(args).items():
        assert getattr(c, name) == value, name
    assert not set(vars(args)) & set(c.extra_args)
    for estimator in ("reinforce", "reinforce_baseline", "grpo", "cpgd", "group_norm", "rloo", "gae"):
        assert StrategyConfig(advantage_estimator=estimator).advantage_estimator == estimator
    for bad, word in [({"advantage_clip": -1.0}, "advantage_clip"), ({"reward_clip": -0.1}, "reward_clip"),
                      ({"overlong_buffer_len": 0}, "overlong_buffer_len"),
                      ({"overlong_buffer_penalty_factor": -1.0}, "overlong_buffer_penalty_factor"),
                      ({"reward_running_norm_minus_mean": True}, "reward_running_norm=True"),
                      ({"advantage_estimator": "ppo"}, "cpgd")]:
        with pytest.raises(ValueError, match=word):
            StrategyConfig(**bad)


# ---------------------------------------------------------------- models
class Actor(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids, labels=ids).loss


def test_prepare_reward_model_lists_none_critic_and_is_actor(tmp_path):
    s = FakeStrategy(seed=0, max_norm=1.0, micro_train_batch_size=2, train_batch_size=2)
    rms = [tiny_causal_lm(seed=2), tiny_causal_lm(seed=3)]
    actor = Actor(tiny_causal_lm(seed=1))
    actor.is_actor = True
    assert is_actor(actor) and not is_actor(actor.model) and not is_engine(actor)
    opt = s.create_optimizer(actor)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in actor.model.parameters()}
    (a, o, sch), critic, out_rms, ref = s.prepare((actor, opt, None), (None, None, None), rms, tiny_causal_lm())
    assert a is actor and o is opt and critic == (None, None, None) and isinstance(out_rms, list) and len(out_rms) == 2
    assert all(not p.requires_grad for m in out_rms for p in m.parameters()) and not out_rms[0].training
    assert s.unwrap_model(actor) is actor.model and s.unwrap_model(actor.model) is actor.model
    ids = torch.randint(0, 64, (2, 6))
    s.backward(actor(ids), actor, opt)
    assert s.optimizer_step(opt, actor, None)
    # trained as `actor`, saved as `actor.model`: the optimizer state goes with it and comes back
    s.save_ckpt(actor.model, str(tmp_path), client_state={"k": 1})
    saved_exp_avg = next(iter(opt.state.values()))["exp_avg"].clone()
    s.backward(actor(ids), actor, opt)
    s.optimizer_step(opt, actor, None)
    assert not torch.equal(next(iter(opt.state.values()))["exp_avg"], saved_exp_avg)
    _, client = s.load_ckpt(actor.model, str(tmp_path), opt)  # LightRFT FSDP's shape: optimizer 3rd
    assert client == {"k": 1} and torch.equal(next(iter(opt.state.values()))["exp_avg"], saved_exp_avg)
    with pytest.raises(ValueError, match="optimizer= is not the optimizer"):
        s.load_ckpt(actor.model, str(tmp_path), optimizer=torch.optim.SGD(actor.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="cannot prepare a str"):
        s.prepare("model")
    # save_model of the wrapper exports the Hugging Face model inside it
    s.save_model(actor, None, str(tmp_path / "hf"))
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert all(torch.equal(a, b) for a, b in zip(reloaded.parameters(), actor.model.parameters()))


def test_prepare_models_and_optimizers_uses_lightrft_schedule():
    args = argparse.Namespace(actor_learning_rate=1e-2, critic_learning_rate=2e-2, lr_warmup_ratio=0.25, l2=0.1,
                              adam_betas=(0.8, 0.9), train_batch_size=1, micro_train_batch_size=1)
    s = get_fake_strategy(args)
    actor, critic = Actor(tiny_causal_lm(seed=1)), tiny_causal_lm(seed=4)
    (a, ao, asch), (c, co, csch), rms, ref = s.prepare_models_and_optimizers(actor, critic, None, None, args, 8)
    assert actor.is_actor and rms is None and ref is None and c is critic
    assert ao.param_groups[0]["betas"] == (0.8, 0.9) and ao.param_groups[0]["weight_decay"] == 0.1
    assert co.defaults["lr"] == 2e-2
    lrs = []
    for _ in range(8):
        lrs.append(asch.get_last_lr()[0])
        s.backward(actor(torch.randint(0, 64, (1, 5))), actor, ao)
        s.optimizer_step(ao, actor, asch)
    warmup = math.ceil(8 * 0.25)
    expected = [1e-2 * i / warmup for i in range(warmup)] + [
        1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (i - warmup) / (8 - warmup)))) for i in range(warmup, 8)]
    assert lrs == pytest.approx(expected)
    assert asch.get_last_lr()[0] == pytest.approx(1e-3)  # the end: min lr = 0.1 x lr
    # a Hugging Face model is not an is_actor wrapper even though it has a `.model`
    hf = tiny_causal_lm()
    s.prepare_models_and_optimizers(hf, None, None, None, None, 4)
    assert not getattr(hf, "is_actor", False)
    m, mo, msch = s.prepare_reward_model(tiny_causal_lm(seed=5), args, max_steps=4)
    assert mo.defaults["lr"] == 1e-2 and msch.get_last_lr()[0] == 0.0


def test_init_model_context_meta_materializes_identically_and_tied():
    s = FakeStrategy(seed=11)
    built = []
    for _ in range(2):
        with s.init_model_context(meta_init=True):
            model = tiny_causal_lm(tie_word_embeddings=True)
        assert all(p.is_meta for p in model.parameters())
        assert not model.model.rotary_emb.inv_freq.is_meta  # buffers stay real
        built.append(s.prepare_model(model, is_training=True))
    a, b = built
    assert not any(p.is_meta for p in a.parameters()) and all(p.requires_grad for p in a.parameters())
    assert a.lm_head.weight is a.model.embed_tokens.weight  # still tied
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    std = a.model.layers[0].mlp.up_proj.weight.std().item()
    assert 0.01 < std < 0.03  # Hugging Face's init (initializer_range 0.02), not torch.empty garbage
    out = a(input_ids=torch.randint(0, 64, (1, 5))).logits
    assert torch.isfinite(out).all()
    frozen = s.prepare_model(tiny_causal_lm())
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    with pytest.raises(ValueError, match="does not shard"):
        s.prepare_model(tiny_causal_lm(), shard_size=2)


def test_setup_dataloader_resumes_after_consumed_samples():
    s = FakeStrategy(seed=3)
    data = list(range(20))
    full = [i for b in s.setup_dataloader(data, 4) for i in b.tolist()]
    resumed = s.setup_dataloader(data, 4, consumed_samples=8)
    assert [i for b in resumed for i in b.tolist()] == full[8:] and len(resumed) == 3
    resumed.sampler.set_epoch(1)
    assert len(list(resumed)) == 5  # a new epoch starts from its beginning
    unshuffled = s.setup_dataloader(data, 3, shuffle=False, drop_last=False, consumed_samples=18)
    assert [b.tolist() for b in unshuffled] == [[18, 19]]
    with pytest.raises(ValueError, match="consumed_samples"):
        s.setup_dataloader(data, 4, consumed_samples=-1)


def test_offload_reload_and_optimizer_state_on_cpu():
    s = FakeStrategy(seed=0, micro_train_batch_size=1, train_batch_size=1)
    model = tiny_causal_lm()
    opt = s.create_optimizer(model)
    s.backward(model(input_ids=torch.ones(1, 4, dtype=torch.long), labels=torch.ones(1, 4, dtype=torch.long)).loss, model, opt)
    s.optimizer_step(opt, model, None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # on CPU the weights and the state already are in CPU memory: nothing moves, nothing breaks
    assert s.offload_model([model, None]) == 0 and s.reload_model(model) == 0
    assert s.maybe_offload_optimizer(opt) is opt and s.last_moved_bytes == 0
    assert s.maybe_load_optimizer(opt) is opt and s.last_moved_bytes == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    stats = s.report_memory("after offload")
    assert stats["rss"] > 0.01


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: on CPU nothing moves")
def test_offload_moves_weights_and_optimizer_state_off_the_gpu_and_back():
    s = FakeStrategy(seed=0, micro_train_batch_size=1, train_batch_size=1)
    model = tiny_causal_lm().cuda()
    opt = s.create_optimizer(model)
    ids = torch.ones(1, 4, dtype=torch.long, device="cuda")
    s.backward(model(input_ids=ids, labels=ids).loss, model, opt)
    s.optimizer_step(opt, model, None)
    before = {k: v.cpu() for k, v in model.state_dict().items()}
    state_bytes = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                      if torch.is_tensor(t) and t.is_cuda)
    moved = s.offload_model(model)
    assert moved > 0 and all(t.device.type == "cpu" for t in model.state_dict().values())
    assert s.reload_model(model) == moved and all(t.is_cuda for t in model.state_dict().values())
    assert all(torch.equal(v.cpu(), before[k]) for k, v in model.state_dict().items())
    s.maybe_offload_optimizer(opt)
    assert s.last_moved_bytes == state_bytes > 0
    assert all(not t.is_cuda for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.dim())
    s.maybe_load_optimizer(opt)
    assert s.last_moved_bytes == state_bytes


def test_moving_average_every_accumulated_gradient_calls(tmp_path):
    s = FakeStrategy(seed=0, micro_train_batch_size=1, train_batch_size=2)
    model, ema = nn.Linear(3, 2), nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    assert not s.moving_average(model, ema, beta=0.9)  # micro-step 1 of 2
    assert all(torch.equal(v, start[k]) for k, v in ema.state_dict().items())
    assert s.moving_average(model, ema, beta=0.9)
    assert torch.allclose(ema.weight, 0.9 * start["weight"] + 0.1 * model.weight)
    assert torch.equal(ema.bias, start["bias"])  # frozen parameters are not averaged
    with pytest.raises(ValueError, match="beta"):
        s.moving_average(model, ema, beta=1.5)
    # load_model: a plain state-dict file, keys renamed by key_replace_fn
    torch.save({"lin." + k: v for k, v in model.state_dict().items()}, tmp_path / "w.pt")
    missing, unexpected = s.load_model(ema, str(tmp_path / "w.pt"),
                                       key_replace_fn=lambda sd: {k[4:]: v for k, v in sd.items()})
    assert missing == [] and unexpected == [] and torch.equal(ema.weight, model.weight)
    with pytest.raises(RuntimeError, match="missing keys"):
        s.load_model(ema, str(tmp_path / "w.pt"), strict=True)


# ---------------------------------------------------------------- the ported script on every backend
def test_lightrft_style_script_fake_fsdp_deepspeed_equal(tmp_path):
    torch.save(tiny_causal_lm(seed=1).state_dict(), tmp_path / "init.pt")
    fake = port.train(LightRFTFake(args=port.lightrft_args()), str(tmp_path / "init.pt"), str(tmp_path / "fake"),
                      meta_init=True)
    result = script_result(torchrun("lightrft_port_train.py", 2, str(tmp_path), timeout=240))
    assert fake["world_size"] == 1 and fake["accumulated_gradient"] == 4
    assert all(n > port.MAX_NORM for n in fake["norms"])  # the global norm was clipped on every step
    for name in ("fsdp", "ds2", "ds3"):
        run = result[name]
        assert run["world_size"] == 2 and run["accumulated_gradient"] == 2, name
        assert run["losses"] == pytest.approx(fake["losses"], abs=1e-5), name
        assert run["norms"] == pytest.approx(fake["norms"], rel=1e-5), name
        assert run["lrs"] == pytest.approx(fake["lrs"]) and run["lr_after_load"] == pytest.approx(fake["lrs"][-1])
        assert run["weights_l2"] == pytest.approx(fake["weights_l2"], rel=1e-6), name
        for key, value in fake["weights"].items():
            assert run["weights"][key] == pytest.approx(value, abs=1e-4), (name, key)
        assert run["ema_l2"] == pytest.approx(fake["ema_l2"], rel=1e-6) and run["ema_time_steps"] == 6
        assert run["moved_after_save"] > 1e-4 and run["restored_diff"] == 0.0, name
        assert run["client_state"] == {"consumed": 24} and run["ckpt"] == "global_step3"
        assert run["actor_is_actor"] and run["offloaded_bytes"] == 0 == run["reloaded_bytes"]
        assert run["engine_tokens"] == fake["engine_tokens"] and run["engine_sleeping"], name
    assert fake["ema_l2"] != pytest.approx(fake["weights_l2"], rel=1e-6)
    assert result["groups"] == {"mp": 2, "dp": 1}
    assert len(fake["engine_tokens"]) == 2 and fake["engine_sleeping"]
    pm = result["prepare_model"]  # shard_size=1: replicated over 2 groups of 1; default: sharded over both ranks
    assert pm["mesh"] == [2, 1] and pm["replicated_local_rows"] == pm["full_rows"] == 2 * pm["sharded_local_rows"]
    assert pm["frozen"] and pm["trainable"] and pm["same_logits"]
    full = result["resume_full"]  # rank 0's 8 indices, then rank 1's
    assert result["resume"] == full[3:7] + full[11:15]  # each rank skipped 6 // 2, drop_last batches of 2


# ---------------------------------------------------------------- engine calls
def test_engine_calls_on_the_fake_strategy():
    from lightrft_lightning.engines.base import SamplingParams

    args = argparse.Namespace(engine_type="hf", enable_engine_sleep=True, engine_sleep_level=2,
                              micro_train_batch_size=1, train_batch_size=1, actor_learning_rate=5e-2)
    s = get_fake_strategy(args)
    actor = Actor(tiny_causal_lm(seed=1))
    (actor, opt, sched), _, _, _ = s.prepare_models_and_optimizers(actor, None, None, None, args, 10)
    engine = s.setup_inference_engine(args, "hf", actor)
    assert s.inference_engine is engine and s.engines == [engine] and engine.is_sleeping  # slept after the push
    prompt = [[3, 4, 5, 6]]

    def greedy_of_actor():
        out = actor.model.generate(input_ids=torch.tensor(prompt), max_new_tokens=5, do_sample=False,
                                   pad_token_id=0, eos_token_id=None)
        return out[0, 4:].tolist()

    vllm_style = argparse.Namespace(temperature=0.0, max_tokens=5, n=1, top_p=1.0, top_k=-1)
    with pytest.raises(RuntimeError, match="no valid weights"):  # sleep level 2 dropped them
        s.gather_and_generate(vllm_style, all_prompt_token_ids=prompt)
    s.update_engine_weights(actor)  # LightRFT's order: push the weights, then generate
    outs = s.gather_and_generate(vllm_style, all_prompt_token_ids=prompt)  # wakes, generates, sleeps again
    assert engine.is_sleeping and len(outs) == 1 and outs[0].prompt_token_ids == prompt[0]
    assert len(outs[0].output_token_ids) == len(outs[0].logprobs) <= 5
    assert outs[0].output_token_ids == greedy_of_actor()[:len(outs[0].output_token_ids)]
    for _ in range(3):  # train, push the new weights, and the engine follows the actor
        ids = torch.tensor([[3, 4, 5, 6, 9, 9, 9, 9]])
        s.backward(actor(ids), actor, opt)
        s.optimizer_step(opt, actor, sched)
    s.wakeup_inference_engine()
    assert s.update_engine_weights(actor) == sum(p.numel() * 4 for p in actor.model.parameters())
    again = s.engine_generate_local(SamplingParams(temperature=0.0, max_new_tokens=5), prompt)
    assert again[0].output_token_ids == greedy_of_actor()[:len(again[0].output_token_ids)]
    assert again[0].output_token_ids != outs[0].output_token_ids  # it learned to continue with 9s
    with pytest.raises(ValueError, match="all_prompt_token_ids"):
        s.gather_and_generate(vllm_style, all_prompts=["text"])
    with pytest.raises(ValueError, match="not supported"):
        s.engine_generate_local({"temperature": 0.0, "presence_penalty": 1.0}, prompt)


def test_build_multimodal_inputs_nested_flat_and_refused_generation():
    pad = "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>"
    vpad = "<|vision_start|><|video_pad|><|vision_end|>"
    prompts = [f"{pad}{pad}two", f"{pad}one", "none " + pad, f"{vpad}video"]
    a1, a2, b1, = "img-a1", "img-a2", "img-b1"
    frames = ["frame0", "frame1", "frame2"]  # a video as a list of frames (flat format)
    expected = [{"prompt": prompts[0], "multi_modal_data": {"image": [a1, a2]}},
                {"prompt": prompts[1], "multi_modal_data": {"image": [b1]}},
                {"prompt": "none "},  # no media: the vision placeholders are removed
                {"prompt": prompts[3], "multi_modal_data": {"video": [frames]}}]
    build = FakeStrategy._build_multimodal_inputs  # a classmethod, as in LightRFT
    nested = build(prompts, [[a1, a2], [b1], [], None], [2, 1, 0, 0], [frames], [0, 0, 0, 1])
    flat = build(prompts, [a1, a2, b1], [2, 1, 0, 0], [frames], [0, 0, 0, 1])
    assert nested == expected and flat == expected
    # images_num=None counts them per prompt (LightRFT would drop every image)
    assert build(prompts[:3], [[a1, a2], b1, None], None, None, None) == expected[:3]
    assert build(["x", f"{vpad}y"], None, None, None, None) == [{"prompt": "x"}, {"prompt": "y"}]
    with pytest.raises(ValueError, match="needs 2 images from position 1"):
        build(["p", "q"], [a1, a2], [1, 2], None, None)  # LightRFT would truncate silently
    with pytest.raises(ValueError, match="images_num has 1 counts for 2 prompts"):
        build(["p", "q"], [a1], [1], None, None)
    # generation refuses multimodal prompts with a clear error; all-None media lists are text
    s = FakeStrategy()
    with pytest.raises(NotImplementedError, match="take token ids only"):
        s.gather_and_generate({"max_new_tokens": 2}, all_prompts=prompts[:2], all_images=[[a1, a2], [b1]],
                              images_num=[2, 1])
    with pytest.raises(NotImplementedError, match="take token ids only"):
        s.engine_generate_local({"max_new_tokens": 2}, multi_modal_inputs=expected)
    with pytest.raises(ValueError, match="all_prompt_token_ids is required"):
        s.gather_and_generate({"max_new_tokens": 2}, all_prompts=["text"], all_images=[None])


# ---------------------------------------------------------------- trainer.init_module(empty_init=True)
def _init_script():
    spec = importlib.util.spec_from_file_location("lightrft_port_init", SCRIPTS / "lightrft_port_init.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trainer_init_module_empty_init_trains_as_built_normally():
    """On the fake in-process, then FSDP2 and DeepSpeed ZeRO-3 on 2 ranks: the policy built under
    ``trainer.init_module(empty_init=True)`` is on the meta device, and setup gives it the weights of a
    normal build, bit for bit, so training gives the same numbers."""
    init = _init_script()
    runs = {mode: init.fit(LightRFTFake(StrategyConfig(max_norm=0.0)), mode)
            for mode in ("normal", "configure", "eager", "eager_empty")}
    normal = runs["normal"]
    assert not normal["meta"] and runs["configure"]["meta"] and runs["eager_empty"]["meta"]
    assert len(normal["losses"]) == init.STEPS and normal["start"] != normal["end"]
    for mode in ("configure", "eager", "eager_empty"):
        assert runs[mode]["start"] == normal["start"], mode  # exact: same weights at fit start
        assert runs[mode]["losses"] == normal["losses"] and runs[mode]["end"] == normal["end"], mode
    result = script_result(torchrun("lightrft_port_init.py", 2, timeout=240))
    for name in ("fsdp", "ds3"):
        plain, empty = result[f"{name}_normal"], result[f"{name}_configure"]
        assert empty["meta"] and not plain["meta"], name
        assert plain["start"] == normal["start"] and empty["start"] == normal["start"], name  # every rank's weights
        assert empty["losses"] == plain["losses"] and empty["end"] == plain["end"], name
        assert len(plain["losses"]) == init.STEPS and plain["end"] != plain["start"], name


# ---------------------------------------------------------------- the ported example (examples/lightrft_style)
def _trained_away_from_init(model_dir) -> float:
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(str(model_dir))
    init = tiny_causal_lm(seed=1, vocab_size=trained.config.vocab_size)
    return max((a - b).abs().max().item() for a, b in zip(trained.parameters(), init.parameters()))


def test_ported_lightrft_example_runs_on_fake_fsdp_and_deepspeed(tmp_path):
    spec = importlib.util.spec_from_file_location("lightrft_port_example", SCRIPTS / "lightrft_port_example.py")
    wrapper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wrapper)
    fake = wrapper.example().main(wrapper.tiny_args(tmp_path / "fake", "--strategy", "fake"))
    result = script_result(torchrun("lightrft_port_example.py", 2, str(tmp_path), timeout=240))
    runs = {"fake": fake, **{name: result[name] for name in ("fsdp", "deepspeed")}}
    for name, run in runs.items():
        world = 1 if name == "fake" else 2
        assert run["world_size"] == world and run["accumulated_gradient"] == 4 // world, name
        assert len(run["rewards"]) == 2 and all(0.0 < r < 1.0 for r in run["rewards"]), name
        assert all(math.isfinite(loss) for loss in run["losses"]) and run["consumed_samples"] == 8, name
        ckpt = Path(run["ckpt"])  # save_ckpt(actor.model, ...): the step-2 checkpoint, named by `latest`
        assert ckpt.name == "global_step2" and (ckpt.parent / "latest").read_text().strip() == "global_step2", name
        export = Path(run["save_path"])  # save_model(actor, tokenizer, dir): a Hugging Face directory
        assert (export / "model.safetensors").is_file() and (export / "tokenizer.json").is_file(), name
        assert _trained_away_from_init(export) > 1e-4, name
    assert runs["deepspeed"]["strategy"] == "LightRFTDeepSpeed" and runs["fsdp"]["strategy"] == "LightRFTFSDP"

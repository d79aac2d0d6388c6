"""LightRFTFake: the LightRFT API semantics in one process (accumulation, clipping, skipping,
checkpoints, prepare, engines, factory)."""

import copy
import io
from contextlib import redirect_stdout

import pytest
import torch

from lightrft_lightning import FakeStrategy, LightRFTFake, StrategyBase, StrategyConfig, get_strategy, register_strategy
from lightrft_lightning.tiny_models import tiny_causal_lm


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def train(strategy, model, batches, scheduler_factory=None, lr=1e-2):
    model = strategy.prepare(model)
    optimizer = strategy.create_optimizer(model, lr=lr)
    scheduler = scheduler_factory(optimizer) if scheduler_factory else None
    losses = []
    for ids in batches:
        loss = lm_loss(model, ids)
        strategy.backward(loss, model, optimizer)
        strategy.optimizer_step(optimizer, model, scheduler)
        losses.append(loss.item())
    return model, optimizer, scheduler, losses


def max_param_diff(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def test_accumulation_equals_one_big_batch():
    """N micro-steps of batch b give the same parameters as one step of batch N*b (averaged grads)."""
    torch.manual_seed(0)
    data = torch.randint(0, 64, (3, 8, 12))  # 3 optimizer steps of 8 sequences
    n, b = 4, 2
    micro = LightRFTFake(StrategyConfig(train_batch_size=n * b, micro_train_batch_size=b, max_norm=0.5))
    big = LightRFTFake(StrategyConfig(train_batch_size=n * b, micro_train_batch_size=n * b, max_norm=0.5))
    m_micro, *_ = train(micro, tiny_causal_lm(seed=1), [chunk for step in data for chunk in step.split(b)], lr=1e-3)
    m_big, *_ = train(big, tiny_causal_lm(seed=1), list(data), lr=1e-3)
    diff = max_param_diff(m_micro, m_big)
    print(f"accumulation max abs param difference: {diff:.3e}")
    assert diff <= 1e-6
    assert max_param_diff(m_micro, tiny_causal_lm(seed=1)) > 1e-3  # it did train


def test_clipping_bounds_the_update():
    model = torch.nn.Linear(4, 1, bias=False)
    strategy = LightRFTFake(StrategyConfig(train_batch_size=1, max_norm=0.1))
    model = strategy.prepare(model)
    optimizer = strategy.create_optimizer(model, lr=1.0, betas=(0.0, 0.0))
    loss = (model(torch.full((1, 4), 100.0)) ** 2).sum()
    strategy.backward(loss, model, optimizer)
    grad = model.weight.grad.clone()
    strategy.optimizer_step(optimizer, model, None)
    state = strategy.stepper(model)
    assert state.grad_norm == pytest.approx(grad.norm().item(), rel=1e-5)
    assert state.grad_norm > 0.1


def test_non_finite_gradient_skips_and_counts():
    model = torch.nn.Linear(2, 1)
    strategy = FakeStrategy(StrategyConfig(train_batch_size=1))
    model = strategy.prepare(model)
    optimizer = strategy.create_optimizer(model, lr=0.1)
    before = copy.deepcopy(model.state_dict())
    loss = model(torch.tensor([[float("inf"), 1.0]])).sum()
    strategy.backward(loss, model, optimizer)
    assert strategy.optimizer_step(optimizer, model, None) is False
    assert strategy.skipped_steps == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    # training goes on
    strategy.backward(model(torch.ones(1, 2)).sum(), model, optimizer)
    assert strategy.optimizer_step(optimizer, model, None) is True
    assert not torch.equal(before["weight"], model.weight)


def test_checkpoint_round_trip(tmp_path):
    strategy = LightRFTFake(StrategyConfig(train_batch_size=2, micro_train_batch_size=1))
    sched = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # noqa: E731
    batches = list(torch.randint(0, 64, (6, 2, 10)))
    model, optimizer, scheduler, _ = train(strategy, tiny_causal_lm(seed=3), batches[:4], sched)
    path = strategy.save_ckpt(model, str(tmp_path), client_state={"consumed_samples": 16, "rng": torch.get_rng_state()})
    assert (tmp_path / "latest").read_text() == "global_step2"
    expected_model, expected_opt = copy.deepcopy(model), copy.deepcopy(optimizer.state_dict())
    # continue the original two more micro-steps for the reference trajectory
    _continue = [lm_loss(model, ids) for ids in batches[4:]]
    for loss in _continue:
        strategy.backward(loss, model, optimizer)
        strategy.optimizer_step(optimizer, model, scheduler)

    fresh_strategy = LightRFTFake(StrategyConfig(train_batch_size=2, micro_train_batch_size=1))
    fresh = fresh_strategy.prepare(tiny_causal_lm(seed=99))
    fresh_opt = fresh_strategy.create_optimizer(fresh, lr=1e-2)
    fresh_sched = sched(fresh_opt)
    fresh_strategy.optimizer_step(fresh_opt, fresh, fresh_sched)  # registers the scheduler (no grads: a no-op step)
    loaded_path, client = fresh_strategy.load_ckpt(fresh, str(tmp_path))
    assert loaded_path == path and client["consumed_samples"] == 16 and torch.equal(client["rng"], torch.get_rng_state()) is not None
    assert max_param_diff(fresh, expected_model) == 0.0
    assert fresh_sched.get_last_lr() == pytest.approx([1e-2 * 0.25])
    state_a = fresh_opt.state_dict()["state"]
    for key, value in expected_opt["state"].items():
        assert torch.equal(state_a[key]["exp_avg"], value["exp_avg"])
    for ids in batches[4:]:
        loss = lm_loss(fresh, ids)
        fresh_strategy.backward(loss, fresh, fresh_opt)
        fresh_strategy.optimizer_step(fresh_opt, fresh, fresh_sched)
    assert max_param_diff(fresh, model) == 0.0  # resumed trajectory is bitwise identical


def test_rotation_keeps_max_num(tmp_path):
    strategy = LightRFTFake(StrategyConfig(train_batch_size=1))
    model = strategy.prepare(torch.nn.Linear(2, 2))
    strategy.create_optimizer(model)
    for step in range(5):
        strategy.save_ckpt(model, str(tmp_path), tag=f"step{step}", max_num=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step3", "step4"]
    assert (tmp_path / "latest").read_text() == "step4"


def test_load_missing_checkpoint_names_file(tmp_path):
    strategy = LightRFTFake()
    model = strategy.prepare(torch.nn.Linear(2, 2))
    with pytest.raises(FileNotFoundError, match="latest"):
        strategy.load_ckpt(model, str(tmp_path))
    (tmp_path / "t").mkdir()
    with pytest.raises(FileNotFoundError, match=r"\.metadata"):
        strategy.load_ckpt(model, str(tmp_path), tag="t")


def test_prepare_tuples_train_and_bare_models_freeze():
    strategy = LightRFTFake()
    actor, ref = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(actor.parameters(), lr=0.1)
    (actor_out, opt_out, sched_out), ref_out = strategy.prepare((actor, optimizer, None), ref, is_rlhf=True)
    assert actor_out.training and all(p.requires_grad for p in actor_out.parameters()) and opt_out is optimizer
    assert not ref_out.training and not any(p.requires_grad for p in ref_out.parameters())
    # the seed's order: prepare a bare model, then create its optimizer -> trainable again
    model = strategy.prepare(torch.nn.Linear(2, 2))
    optimizer = strategy.create_optimizer(model, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1)
    assert model.training and all(p.requires_grad for p in model.parameters())
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (1e-5, (0.9, 0.95), 0.1)
    assert strategy.prepare(None) is None


def test_collectives_in_one_process():
    strategy = LightRFTFake()
    assert strategy.all_reduce({"a": 2.0, "b": torch.tensor([1.0, 3.0])}, op="max")["a"] == 2.0
    assert torch.equal(strategy.all_gather(torch.tensor([1, 2])), torch.tensor([1, 2]))
    assert torch.equal(strategy.all_gather(5), torch.tensor([5]))
    # Lightning's call shape (LightningModule.all_gather passes group= and sync_grads=)
    assert torch.equal(strategy.all_gather(torch.tensor(3.0), group=None, sync_grads=False), torch.tensor(3.0))
    with pytest.raises(ValueError, match="'mean', 'sum', 'max'"):
        strategy.all_reduce(1.0, op="min")


def test_print_is_rank_0_only():
    out = io.StringIO()
    with redirect_stdout(out):
        LightRFTFake().print("hello", 1)
    assert out.getvalue() == "hello 1\n"


class RecordingEngine:
    def __init__(self):
        self.calls = []

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))


def test_engines_sleep_and_wake():
    engine = RecordingEngine()
    strategy = LightRFTFake(StrategyConfig(engine_sleep_level=2))
    strategy.engines_sleep([engine])
    strategy.engines_wake_up([engine], tags=["weights"])
    strategy.engines = [engine]
    strategy.engines_sleep()
    assert engine.calls == [("sleep", 2), ("wake_up", ["weights"]), ("sleep", 2)]
    LightRFTFake(StrategyConfig(enable_engine_sleep=False)).engines_sleep([engine])
    assert len(engine.calls) == 3


def test_factory_builds_fake_and_reports_unknown():
    assert isinstance(get_strategy({"strategy": "fake"}), LightRFTFake)
    with pytest.raises(ValueError, match="'nope' is unknown; accepted: .*deepspeed.*fake.*fsdp"):
        get_strategy({"strategy": "nope"})


def test_user_strategy_extends_the_factory():
    class MyCustomStrategy(StrategyBase):
        def setup_distributed(self, timeout=None):
            self.ready = True

    register_strategy("mine", MyCustomStrategy)
    try:
        strategy = get_strategy({"strategy": "mine", "seed": 3, "custom": "x", "train_batch_size": 1})
        strategy.setup_distributed()
        assert isinstance(strategy, MyCustomStrategy) and strategy.ready and strategy.config.seed == 3
        assert strategy.config.get_extra_arg("custom") == "x"
        with pytest.raises(ValueError, match="already registered"):
            register_strategy("mine", MyCustomStrategy)
        # the inherited LightRFT API works on a user's strategy too
        model = strategy.prepare(torch.nn.Linear(2, 1))
        optimizer = strategy.create_optimizer(model, lr=0.1)
        strategy.backward(model(torch.ones(1, 2)).sum(), model, optimizer)
        assert strategy.optimizer_step(optimizer, model, None)
    finally:
        from lightrft_lightning import factory

        factory._BUILDERS.pop("mine", None)


def test_engine_calls_without_an_engine_are_no_ops():
    """LightRFT's FakeStrategy documents them so (its test_inference_engine_methods / test_update_engine_weights):
    trainer code runs on the fake without building an engine."""
    s = LightRFTFake()
    model = torch.nn.Linear(2, 2)
    assert s.setup_inference_engine(None) is None and s.inference_engine is None
    s.maybe_sleep_inference_engine()
    s.wakeup_inference_engine()
    assert s.engine_generate_local(None) == [] and s.gather_and_generate(None) == []
    assert s.update_engine_weights(model) == 0
    with pytest.raises(ValueError, match="all_prompt_token_ids is required"):  # prompts are still checked
        s.gather_and_generate(None, all_prompts=["p"])

"""Dynamic sampling that refills (RefillRollout): every step holds the configured groups with signal,
batch shapes stay fixed, the sampler's stream covers the refills and resumes exactly."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightrft_lightning import LightRFTFake
from lightrft_lightning.algorithms import GRPO, Advantages, GRPOLoss, Policy, RefillRollout, RLModule, Training
from lightrft_lightning.algorithms.refill import concat, select
from lightrft_lightning.algorithms.experience import Experience
from lightrft_lightning.callbacks.dcp_checkpoint import DCPCheckpoint
from lightrft_lightning.data import PromptDataModule, PromptDataset, collate_prompts
from lightrft_lightning.sampler import ResumableSampler
from lightrft_lightning.tasks import counting_prompts
from tests.scripts.ckpt_common import max_diff, params

torch.set_num_threads(1)
N = 2  # samples per prompt: a random model's groups of 2 often tie (both 0)


class RecordingRefill(RefillRollout):
    """Keeps, per step, the prompt indices generated and the shape and rewards of the experience returned."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.generated: list[list[int]] = []
        self.out: list[tuple[int, torch.Tensor]] = []

    def __call__(self, module, rows):
        self.generated.append([])
        exp, metrics = super().__call__(module, rows)
        self.out.append((len(exp), exp.rewards.cpu()))
        return exp, metrics

    def render(self, rows):
        if self.generated:
            self.generated[-1].extend(row["index"] for row in rows)
        return super().render(rows)


def refill_module(max_num_gen_batches: int = 8, batch_multiplier: float = 1.0, **training) -> RLModule:
    rollout = RecordingRefill(n_samples_per_prompt=N, max_new_tokens=4, max_num_gen_batches=max_num_gen_batches,
                              batch_multiplier=batch_multiplier)
    return RLModule(GRPOLoss(), Policy(tokenizer_chars="0123456789", model_config={"hidden_size": 32}), rollout,
                    Advantages(dynamic_sampling=True),
                    Training(micro_train_batch_size=4, actor_learning_rate=1e-2, **training))


def fit(module, data, steps, callbacks=()):
    metrics: list[dict[str, float]] = []

    class Keep(pl.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()
                            if not k.startswith(("time/", "perf/", "rollout/"))})  # not the timings

    trainer = pl.Trainer(accelerator="cpu", strategy=LightRFTFake({"bf16": False}), max_steps=steps, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, enable_checkpointing=bool(callbacks), callbacks=[Keep(), *callbacks])
    trainer.fit(module, data)
    return trainer, metrics


def data(num: int = 64) -> PromptDataModule:
    return PromptDataModule(prompts=counting_prompts(num, seed=3), batch_size=4, seed=1)


def test_every_step_holds_the_configured_groups_with_signal():
    pl.seed_everything(0, verbose=False)
    module = refill_module()
    _, metrics = fit(module, data(), 4)
    rollout = module.rollout
    for (samples, rewards), m in zip(rollout.out, metrics):
        groups = rewards.view(-1, N)
        assert samples == 4 * N  # the step's shape: 4 prompts x N samples
        assert (groups != groups[:, :1]).any(1).all(), groups  # every group has signal
        assert m["dynamic_sampling/signal_fraction"] == 1.0 and m["groups/all_tied"] == 0.0
        assert m["dynamic_sampling/kept"] == 1.0 and m["dynamic_sampling/exhausted"] == 0.0
    rounds = [m["dynamic_sampling/rounds"] for m in metrics]
    assert max(rounds) > 1, rounds  # ties are common: refills happened
    assert [float(len(g)) for g in rollout.generated] == [m["dynamic_sampling/prompts"] for m in metrics]
    drawn = [i for step in rollout.generated for i in step]
    assert len(drawn) == len(set(drawn))  # no prompt generated twice in the epoch
    # the same run with masking: tied groups stay in the batch, out of the loss
    pl.seed_everything(0, verbose=False)
    _, masked = fit(GRPO(tokenizer_chars="0123456789", model_config={"hidden_size": 32}, n_samples_per_prompt=N,
                         max_new_tokens=4, micro_train_batch_size=4, actor_learning_rate=1e-2, dynamic_sampling=True),
                    data(), 4)
    assert max(m["groups/all_tied"] for m in masked) > 0 and "dynamic_sampling/rounds" not in masked[0]


def test_exhausted_rounds_fill_with_tied_groups_that_the_loss_masks():
    pl.seed_everything(0, verbose=False)
    module = refill_module(max_num_gen_batches=1)
    _, metrics = fit(module, data(), 3)
    assert all(m["dynamic_sampling/rounds"] == 1.0 for m in metrics)
    short = [m for m in metrics if m["dynamic_sampling/exhausted"] == 1.0]
    assert short, metrics  # one generation of 4 groups of 2 rarely has signal in all 4
    for m in short:
        assert m["dynamic_sampling/signal_fraction"] < 1.0
        assert m["dynamic_sampling/kept"] == m["dynamic_sampling/signal_fraction"]  # the fill is masked
    assert [len(g) for g in module.rollout.generated] == [4, 4, 4]


def test_refill_resumes_exactly(tmp_path):
    def run(steps, path, seed=0):
        pl.seed_everything(seed, verbose=False)
        module = refill_module(batch_multiplier=1.5)
        callback = DCPCheckpoint(path, every_n_train_steps=2)
        _, metrics = fit(module, data(40), steps, [callback])
        return module, metrics, callback

    straight, straight_metrics, _ = run(5, tmp_path / "a")  # 40 prompts: the refills end epoch 0 early
    first, _, _ = run(2, tmp_path / "b")
    resumed, metrics, callback = run(5, tmp_path / "b", seed=7)  # other seed: all comes from the checkpoint
    assert callback.resumed_from == "global_step2"
    assert first.rollout.generated + resumed.rollout.generated == straight.rollout.generated
    assert metrics == straight_metrics[2:]
    assert max_diff(params(resumed.actor), params(straight.actor)) == 0.0
    epoch0 = [i for step in straight.rollout.generated[:2] for i in step]
    assert len(epoch0) == len(set(epoch0))


def test_sampler_lends_rows_and_saves_fetched_untrained_batches():
    ds = PromptDataset([str(i) for i in range(20)])
    order = list(ResumableSampler(ds, batch_size=2, seed=3))
    s = ResumableSampler(ds, batch_size=2, seed=3)
    it = iter(s)
    first = [next(it), next(it)]
    assert s.draw(3) == order[2:5]  # a refill takes the next rows of the stream
    second = [next(it), next(it)]  # fetched ahead, not trained
    assert first + second == order[:2] + order[5:7]
    state = s.state_dict(trained_batches=1)
    assert state["pending"] == second and state["consumed"] == 7
    resumed = ResumableSampler(ds, batch_size=2, seed=3)
    resumed.load_state_dict(state)
    assert list(resumed) == second + order[7:19]  # the untrained batch first, then whole batches of the stream
    assert s.draw(100) == order[7:] and list(it) == []  # a refill to the end: the epoch ends early
    # a checkpoint from before refills (no pending) resumes as it did
    old = ResumableSampler(ds, batch_size=2, seed=3)
    old.load_state_dict({"epoch": 0, "consumed": 4, "seed": 3})
    assert list(old) == order[4:] and old.state_dict(trained_batches=10)["pending"] == []
    ranks = [ResumableSampler(ds, batch_size=2, num_replicas=2, rank=r, seed=3) for r in (0, 1)]
    assert [r.draw(2) for r in ranks] == [order[0:4:2], order[1:4:2]]  # each rank its part of the same positions


def test_concat_pads_and_select_takes_groups():
    a = Experience(torch.tensor([[1, 2, 3]]), torch.ones(1, 3), torch.ones(1, 2), rewards=torch.tensor([1.0]))
    b = Experience(torch.tensor([[4, 5], [6, 7]]), torch.ones(2, 2), torch.ones(2, 1), rewards=torch.tensor([0.0, 2.0]))
    out = concat([a, select(b, torch.tensor([1]))], pad_token_id=9)
    assert out.input_ids.tolist() == [[1, 2, 3], [6, 7, 9]] and out.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert out.action_mask.tolist() == [[1, 1], [1, 0]] and out.rewards.tolist() == [1.0, 2.0] and out.old_logp is None


@pytest.mark.parametrize("kwargs, match", [
    ({"dynamic_sampling_mode": "refil", "dynamic_sampling": True}, r"GRPO.dynamic_sampling_mode='refil' is invalid; "
                                                                    r"accepted: 'mask', 'refill'"),
    ({"dynamic_sampling_mode": "refill"}, r"dynamic_sampling_mode='refill' is only used with dynamic_sampling=True"),
    ({"max_num_gen_batches": 2, "dynamic_sampling": True}, r"only used with dynamic_sampling_mode='refill'"),
    ({"dynamic_sampling": True, "dynamic_sampling_mode": "refill", "max_num_gen_batches": 0},
     r"GRPO.max_num_gen_batches=0 is invalid; accepted: an integer >= 1"),
    ({"dynamic_sampling": True, "dynamic_sampling_mode": "refill", "batch_multiplier": 0.5},
     r"GRPO.batch_multiplier=0.5 is invalid; accepted: a number >= 1"),
    ({"dynamic_sampling": True, "dynamic_sampling_mode": "refill", "n_samples_per_prompt": 1,
      "advantage_estimator": "reinforce++"}, r"n_samples_per_prompt"),
])
def test_bad_settings_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GRPO(tokenizer_chars="0123456789", model_config={"hidden_size": 32}, **kwargs)


def test_refill_needs_the_resumable_sampler():
    module = refill_module(train_batch_size=4 * N)
    loader = DataLoader(PromptDataset(counting_prompts(8)), batch_size=4, collate_fn=collate_prompts)
    strategy = LightRFTFake({"bf16": False, "rollout_batch_size": 4})
    trainer = pl.Trainer(accelerator="cpu", strategy=strategy, max_steps=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="draws more prompts from the training DataLoader's sampler"):
        trainer.fit(module, loader)


def test_two_fsdp_ranks_refill_in_lockstep(tmp_path, monkeypatch):
    """Each rank holds its 4 groups with signal; the ranks generate and draw as often as each other (a
    rank that stopped early would leave the other waiting in a collective)."""
    import json

    from tests.launch import ROOT, torchrun

    monkeypatch.chdir(ROOT)
    out, m = tmp_path / "steps.json", "--model.init_args."
    torchrun("grpo_strategies.py", 2, "examples/grpo_tiny_fsdp.yaml", str(out), "2", f"{m}temperature=1.0",
             f"{m}advantage_estimator=group_norm", f"{m}dynamic_sampling=true", f"{m}dynamic_sampling_mode=refill",
             f"{m}max_num_gen_batches=8", f'{m}rewards={{"lightrft_lightning.tasks:counting_reward": 1.0}}',
             env={"PYTHONPATH": str(ROOT)}, timeout=300)
    steps = json.loads(out.read_text())["steps"]  # rank 0's view: the mean over the 2 ranks
    assert len(steps) == 2
    for step in steps:
        assert step["dynamic_sampling/signal_fraction"] == 1.0 and step["groups/all_tied"] == 0.0
        assert step["dynamic_sampling/rounds"] == int(step["dynamic_sampling/rounds"])  # the same on both ranks
    assert max(s["dynamic_sampling/rounds"] for s in steps) > 1

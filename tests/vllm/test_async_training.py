"""Asynchronous GRPO (AsyncRollout) against a real vLLM server (the session's first tiny server), one
process (LightRFTFake): with a deliberately slow engine and with a deliberately slow learner the staleness
never exceeds ``max_off_policy_steps`` and every prompt drawn is trained once (or is in the pipeline at the
end); a run resumed from a checkpoint in the middle trains the same prompts in the same order as an
uninterrupted one; an engine error surfaces in the trainer and the producer stops. With a push landing while a
batch generates: in_flight="keep" continues its completions on the new weights (versions per token),
in_flight="abort" generates them again (one version each)."""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import lightning.pytorch as pl
import pytest
import torch

from lightrft_lightning import LightRFTFake
from lightrft_lightning.algorithms import GRPO
from lightrft_lightning.callbacks import RolloutEngineCallback
from lightrft_lightning.callbacks.dcp_checkpoint import DCPCheckpoint
from lightrft_lightning.data import PromptDataModule
from lightrft_lightning.engines.server import VLLMServerEngine
from lightrft_lightning.tasks import counting_prompts
from tests.vllm.conftest import SERVER_KEY as KEY

torch.set_num_threads(1)
PROMPTS = 2  # per step


class SlowEngine(VLLMServerEngine):
    """A server engine that takes ``delay`` s more per batch, or fails at batch ``fail_at``."""

    def __init__(self, *args, delay: float = 0.0, fail_at: int = -1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.delay, self.fail_at, self.batches = delay, fail_at, 0

    def _generate(self, prompt_token_ids, params):
        self.batches += 1
        if self.batches == self.fail_at:
            raise ConnectionError("the server went away (test)")
        time.sleep(self.delay)
        return super()._generate(prompt_token_ids, params)


class HeldPush(VLLMServerEngine):
    """A server engine whose pushes land while a batch generates: batch ``b`` (``b`` in ``held``; with
    max_off_policy_steps=1 the push of step ``b - 1`` finds it generating) is sent once push ``b`` has begun,
    streamed (test-side) and without stopping at EOS, and push ``b`` pauses the server once the first of its
    tokens has arrived. A push that the server serves later than a whole batch (a loaded machine) lands between
    batches instead, so several are held."""

    def __init__(self, *args, held: range, **kwargs) -> None:
        self.held, self.batches, self.pushes = held, 0, 0
        self.push_begun = {b: threading.Event() for b in held}
        self.first_tokens = {b: threading.Event() for b in held}
        super().__init__(*args, **kwargs)

    def _generate(self, prompt_token_ids, params):
        self.batches += 1
        if self.batches in self.held:
            assert self.push_begun[self.batches].wait(60)
            params = dataclasses.replace(params, stop_at_eos=False)
        return super()._generate(prompt_token_ids, params)

    def _send(self, buckets, version):
        self.pushes += 1
        if self.pushes in self.held:
            self.push_begun[self.pushes].set()
            assert self.first_tokens[self.pushes].wait(60)
        super()._send(buckets, version)

    def _call(self, method, url, path, timeout=None, **kwargs):
        batch = self.batches
        if path != "/inference/v1/generate" or batch not in self.held:
            return super()._call(method, url, path, timeout, **kwargs)
        response = self._session.post(f"{url}{path}", json={**kwargs["json"], "stream": True}, stream=True, timeout=60)
        assert response.status_code == 200, response.text
        choices: dict[int, dict] = {}  # the answer of a request not streamed, from the chunks
        for line in response.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            for chunk in json.loads(line[len(b"data: "):]).get("choices", []):
                choice = choices.setdefault(chunk["index"], {"index": chunk["index"], "token_ids": [],
                                                             "logprobs": {"content": []}})
                choice["token_ids"] += chunk.get("token_ids") or []
                choice["logprobs"]["content"] += (chunk.get("logprobs") or {}).get("content") or []
                choice.update(finish_reason=chunk.get("finish_reason"), weight_versions=chunk.get("weight_versions"))
                if choice["token_ids"]:
                    self.first_tokens[batch].set()
        return {"choices": list(choices.values())}


class Record(pl.Callback):
    """Per step: the prompt indices trained, the logged metrics, each sample's token versions; ``learner_delay``
    s more per step."""

    def __init__(self, learner_delay: float = 0.0) -> None:
        self.learner_delay, self.trained, self.metrics = learner_delay, [], []
        self.versions, self.lengths = [], []  # per step, per sample: each token's weight version; tokens

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        time.sleep(self.learner_delay)
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def module(model: str, steps_off: int, max_new_tokens: int = 4, in_flight: str = "finish", n: int = 2) -> GRPO:
    grpo = GRPO(model=model, n_samples_per_prompt=n, max_new_tokens=max_new_tokens, micro_train_batch_size=4,
                actor_learning_rate=1e-3, max_off_policy_steps=steps_off, in_flight=in_flight)
    score = grpo.rollout.score

    def recording_score(module, rows, prompts, prompt_ids, completions, *args):  # what each step trains on
        record.trained.append([row["index"] for row in rows])
        record.versions.append([c.versions for c in completions])
        record.lengths.append([len(c.token_ids) for c in completions])
        return score(module, rows, prompts, prompt_ids, completions, *args)

    grpo.rollout.score = recording_score
    record = Record()
    grpo.record = record
    return grpo


def fit(grpo: GRPO, engine: VLLMServerEngine, steps: int, tmp_path, learner_delay: float = 0.0, ckpt=None,
        prompts: int = PROMPTS) -> Record:
    record = grpo.record
    record.learner_delay = learner_delay
    callbacks = [RolloutEngineCallback(engine=engine), record] + ([ckpt] if ckpt else [])
    trainer = pl.Trainer(accelerator="cpu", strategy=LightRFTFake({"bf16": False}), max_steps=steps, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, enable_checkpointing=ckpt is not None, callbacks=callbacks,
                         default_root_dir=tmp_path)
    trainer.fit(grpo, PromptDataModule(prompts=counting_prompts(40, seed=3), batch_size=prompts, seed=1))
    return record


def producers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "lightrft-async-rollout"]


@pytest.mark.parametrize("slow", ["engine", "learner"])
def test_a_slow_side_keeps_the_bound_and_every_prompt_is_trained_once(slow, tiny_servers, tmp_path):
    model, servers = tiny_servers
    k, steps = 2, 4
    pl.seed_everything(0, verbose=False)
    grpo = module(model, k)
    engine = SlowEngine([servers[0].url], api_key=KEY, timeout_s=60, delay=1.0 if slow == "engine" else 0.0)
    record = fit(grpo, engine, steps, tmp_path, learner_delay=0.5 if slow == "learner" else 0.0)
    stale = [m["staleness/steps_max"] for m in record.metrics]
    print(f"FIGURE async k={k} slow {slow}: staleness per step {stale}, learner wait s "
          f"{[round(m['async/learner_wait_s'], 2) for m in record.metrics]}, engine idle s "
          f"{[round(m['async/engine_idle_s'], 2) for m in record.metrics]}")
    assert len(stale) == steps and all(0 <= s <= k for s in stale)
    assert all(m["staleness/mean"] == m["staleness/steps_max"] and "mismatch/tokens_truncated" in m
               for m in record.metrics)  # the correction (TIS) is on
    if slow == "learner":  # the engine ran ahead as far as the bound lets it, and no further
        assert stale == [0, 1, 2, 2]
    else:  # the learner waited for the engine, every step after the first
        assert all(m["async/learner_wait_s"] > 0.1 for m in record.metrics[1:])
    trained = [i for step in record.trained for i in step]
    pending = [row["index"] for rows in grpo.rollout.pending_rows() for row in rows]
    assert len(trained) == steps * PROMPTS and len(pending) == k * PROMPTS
    assert len(set(trained + pending)) == len(trained + pending)  # none twice
    assert not producers()  # stopped with fit


def test_a_run_resumed_mid_pipeline_trains_every_prompt_once_in_order(tiny_servers, tmp_path):
    model, servers = tiny_servers
    k, steps = 2, 4

    def run(stop: int, path=None) -> tuple[GRPO, Record]:
        pl.seed_everything(0, verbose=False)
        grpo = module(model, k)
        ckpt = DCPCheckpoint(path, every_n_train_steps=1) if path else None
        return grpo, fit(grpo, VLLMServerEngine([servers[0].url], api_key=KEY, timeout_s=60), stop, tmp_path,
                         ckpt=ckpt)

    straight, straight_record = run(steps)
    _, first = run(2, tmp_path / "ckpt")
    resumed, second = run(steps, tmp_path / "ckpt")
    print(f"FIGURE async k={k} resume at step 2: trained {first.trained} + {second.trained}, straight "
          f"{straight_record.trained}; staleness after the resume "
          f"{[m['staleness/steps_max'] for m in second.metrics]}")
    assert len(second.trained) == steps - 2
    assert first.trained + second.trained == straight_record.trained  # neither replayed nor skipped
    assert resumed.rollout.pending_rows() == straight.rollout.pending_rows()
    # the pipeline's batches are generated again after the resume, on the weights of the step resumed
    assert [m["staleness/steps_max"] for m in second.metrics] == [0, 1]


def test_an_engine_error_surfaces_in_the_trainer_and_stops_the_producer(tiny_servers, tmp_path):
    model, servers = tiny_servers
    pl.seed_everything(0, verbose=False)
    engine = SlowEngine([servers[0].url], api_key=KEY, timeout_s=60, fail_at=3)
    with pytest.raises(RuntimeError, match="producer failed: the server went away"):
        fit(module(model, 1), engine, 4, tmp_path)
    assert not producers()


def test_one_step_off_grpo_on_two_fsdp_ranks_from_the_example_yaml(tiny_servers, tmp_path):
    """The producer on both ranks, the push a collective of the sharded actor (rank 0 sends)."""
    from tests.vllm.common import cli_fit_rows

    model, servers = tiny_servers
    rows = cli_fit_rows(
        "grpo_smollm2_vllm_server", tmp_path, f"--model.init_args.model={model}",
        "--model.init_args.apply_chat_template=false", "--model.init_args.max_new_tokens=4", "--trainer.max_steps=3",
        "--data.batch_size=2", "--model.init_args.max_off_policy_steps=1",
        f"--trainer.callbacks.init_args.engine_kwargs={{urls: [{servers[0].url}], api_key: {KEY}, timeout_s: 120}}",
        timeout=400)
    print(f"FIGURE async k=1 FSDP2 2 ranks: staleness {[r['staleness/steps_max'] for r in rows]}, "
          f"TIS-truncated tokens {[r['mismatch/tokens_truncated'] for r in rows]}")
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    assert [float(r["staleness/steps_max"]) for r in rows] == [0.0, 1.0, 1.0]
    assert all(float(r["staleness/frac_0"]) + float(r["staleness/frac_1"]) == 1.0 for r in rows)


@pytest.mark.parametrize("in_flight", ["keep", "abort"])
def test_a_push_while_a_batch_generates_keeps_or_aborts_its_requests(in_flight, tiny_servers, tmp_path):
    """The pushes of steps 1..3 land while the batch trained at that step generates (HeldPush): "keep" continues
    its completions on the new weights, each token tagged with the version that sampled it; "abort" generates
    them again on the new weights. Either way the bound holds and every prompt is trained once."""
    model, servers = tiny_servers
    k, steps, prompts = 1, 4, 4
    pl.seed_everything(0, verbose=False)
    grpo = module(model, k, max_new_tokens=200, in_flight=in_flight, n=16)
    engine = HeldPush([servers[0].url], api_key=KEY, timeout_s=60, held=range(2, steps + 1))
    record = fit(grpo, engine, steps, tmp_path, prompts=prompts)
    spans = [sum(len(set(v)) > 1 for v in step) for step in record.versions]
    print(f"FIGURE async in_flight={in_flight} k={k}: samples spanning two versions per step {spans} "
          f"(of {prompts * 16}), "
          f"staleness {[m['staleness/steps_max'] for m in record.metrics]}, "
          + (f"token staleness mean {[round(m['staleness/token_mean'], 3) for m in record.metrics]}, mixed "
             f"{[m['async/mixed_frac'] for m in record.metrics]}" if in_flight == "keep" else
             f"aborted {[m['async/aborted'] for m in record.metrics]}"))
    assert [[len(v) for v in step] for step in record.versions] == record.lengths  # a version per token
    assert all(0 <= m["staleness/steps_max"] <= k for m in record.metrics)
    for step, (metrics, versions) in enumerate(zip(record.metrics, record.versions)):
        oldest = [min(v) for v in versions if v]
        assert metrics["staleness/steps_max"] == step - min(oldest)  # a sample's oldest token sets its staleness
    if in_flight == "keep":
        mixed = [v for step in record.versions for v in step if len(set(v)) > 1]
        assert mixed and all(v == sorted(v) and len(set(v)) == 2 for v in mixed)  # old tokens, then new ones
        assert max(m["async/mixed_frac"] for m in record.metrics) > 0
        assert any(0 < m["staleness/token_mean"] < m["staleness/steps_max"] for m in record.metrics)
    else:
        assert all(len(set(v)) == 1 for step in record.versions for v in step)  # one version per completion
        assert sum(m["async/aborted"] for m in record.metrics) > 0  # and the aborted ones generated again
    trained = [i for step in record.trained for i in step]
    pending = [row["index"] for rows in grpo.rollout.pending_rows() for row in rows]
    assert len(trained) == steps * prompts and len(set(trained + pending)) == len(trained + pending)
    assert not producers()

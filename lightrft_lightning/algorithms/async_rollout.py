"""`AsyncRollout`: generation runs ahead of the learner on an engine with devices of its own (vLLM servers),
at most ``max_off_policy_steps`` weight versions behind.

Each rank runs a pipeline of ``max_off_policy_steps + 1`` batches of prompt rows. At step ``t`` the main
thread pushes the weights of step ``t`` (if an optimizer stepped), hands the step's rows to a producer
thread and trains on the oldest batch of the pipeline, which it waits for if the engine has not finished
it. The first step fills the pipeline with the step's rows and ``max_off_policy_steps`` batches drawn from
the training sampler (:meth:`~lightrft_lightning.sampler.ResumableSampler.draw`, the DataLoader's own stream):
every prompt is trained once, in the order the sampler gave it. A batch handed over at step ``t`` starts
generating with weights of step ``t`` or later and is trained at step ``t + max_off_policy_steps``: the
staleness (learner step - the weight version that generated a sample) never exceeds the bound, and a slow
engine makes the learner wait rather than exceed it; a slow learner leaves the engine idle once the
pipeline is full.

Weights in flight (``in_flight``; rank 0 pauses the servers, sends the weights, labels them with the learner's
step and resumes; every rank's engine handles its own requests):

* ``"finish"`` (default): the producer generates one batch at a time and holds a lock while it does; the
  push takes that lock before the next batch starts, so an update falls between two batches (vLLM's
  ``/pause?mode=wait``): every completion comes from one weight version, recorded per sample.
* ``"keep"`` (partial rollouts): the push does not wait for the batch; the servers pause with ``mode=keep``,
  the requests in flight are frozen, take the new weights and continue on them after ``/resume``. Each token
  records the version that sampled it (vLLM's ``/inference/v1/generate`` reports version spans per output
  token, labelled on the server by the push: exact, no race with the client's reads), so a completion may
  span versions; the engine's per-token log-probs are those of the weights that sampled each token, and the
  correction (TIS, per token) weights each token exactly.
* ``"abort"``: the servers pause with ``mode=abort``; the requests in flight end as aborted and the engine
  sends their samples again, generated on the new weights (what had been generated is thrown away):
  every completion comes from one version; ``async/aborted`` counts the samples aborted.

``"finish"`` is the default: every sample is on one version with nothing thrown away and no endpoint beyond
``/v1/completions``; its cost is that a push waits for the batch generating, which delays the learner only
when that batch is not the one it trains next (``max_off_policy_steps >= 2`` with a fast engine). ``"keep"``
never waits and wastes nothing, at the price of samples mixing weights (the oldest token sets the staleness);
``"abort"`` never waits and keeps samples on one version, at the price of the tokens thrown away. A sample's
version (``Experience.versions``, the bound, ``staleness/*``) is the oldest among its tokens.

Only the main thread runs collectives (the push's gathers, reward models, log-prob forwards); the producer
thread only calls the engine's ``generate`` (HTTP). Scoring (rewards) runs in the main thread when a batch
is trained. Errors of the producer surface in the trainer at the next step; an exception on the learner's
side or the end of ``fit`` stops the producer (:class:`AsyncRolloutCallback`). A checkpoint records the rows
of the batches in the pipeline (given to the producer, not trained); a resumed run generates them again
first, so every prompt is trained once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import lightning.pytorch as pl
import torch

from lightrft_lightning.algorithms.experience import Experience
from lightrft_lightning.algorithms.rollout import Rollout
from lightrft_lightning.engines.base import Completion, RolloutEngine, SamplingParams, check_in_flight
from lightrft_lightning.sampler import training_sampler

log = logging.getLogger(__name__)
DEFAULT_WAIT_TIMEOUT_S = 3600.0


@dataclass
class _Batch:
    """One batch of the pipeline: rows, rendered prompts, and what the producer made of them."""

    rows: list[dict[str, Any]]
    prompts: list[str]
    prompt_ids: list[list[int]]
    version: int = -1
    completions: list[Completion] = field(default_factory=list)
    generate_s: float = 0.0
    error: Optional[BaseException] = None


class _Producer:
    """The thread that generates the batches handed to it, one at a time, in order."""

    def __init__(self, engine: RolloutEngine, params: SamplingParams) -> None:
        self.engine, self.params = engine, params
        self._lock = threading.Lock()  # held while one batch generates, and by a weight push
        self._may_start = threading.Event()  # cleared while a push waits: it goes before the next batch
        self._may_start.set()
        self.idle_s = 0.0  # since the last take_idle
        self._todo: queue.Queue[_Batch] = queue.Queue()
        self._done: queue.Queue[_Batch] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lightrft-async-rollout", daemon=True)
        self._thread.start()

    def submit(self, batch: _Batch) -> None:
        self._todo.put(batch)

    def _run(self) -> None:
        idle_from = time.perf_counter()
        while not self._stop.is_set():
            try:
                batch = self._todo.get(timeout=0.05)
            except queue.Empty:
                continue
            self._may_start.wait()
            with self._lock:
                start = time.perf_counter()
                self.idle_s += start - idle_from
                batch.version = int(self.engine.version)
                try:
                    batch.completions = self.engine.generate(batch.prompt_ids, self.params)
                except BaseException as err:  # handed to the learner, which raises it
                    batch.error = err
                idle_from = time.perf_counter()
                batch.generate_s = idle_from - start
            self._done.put(batch)
            if batch.error is not None:
                return

    @contextlib.contextmanager
    def between_batches(self) -> Iterator[None]:
        """Run the block (a weight push) once the batch generating now is done, before the next starts."""
        self._may_start.clear()
        try:
            with self._lock:
                yield
        finally:
            self._may_start.set()

    def take_idle(self) -> float:
        idle, self.idle_s = self.idle_s, 0.0
        return idle

    def result(self, timeout_s: float) -> _Batch:
        """The next generated batch; raises the producer's error, or after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                batch = self._done.get(timeout=0.1)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the asynchronous rollout's producer thread stopped without a result")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the asynchronous rollout waited {timeout_s:g} s for a batch (AsyncRollout "
                                       "wait_timeout_s); is the engine generating?")
        if batch.error is not None:
            raise RuntimeError(f"the asynchronous rollout's producer failed: {batch.error}") from batch.error
        return batch

    def stop(self, timeout_s: float) -> None:
        """Stop after the batch generating now (a request is bounded by the engine's own timeout)."""
        self._stop.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():  # a daemon thread: it cannot keep the process alive
            log.warning("the asynchronous rollout's producer is still in a request after %.0f s; left to finish",
                        timeout_s)


class AsyncRollout(Rollout):
    """A :class:`~lightrft_lightning.algorithms.rollout.Rollout` whose generation runs ahead of training on an
    engine with devices of its own (see the module docstring). Needs a server engine
    (``engine_type="vllm_server"``) and a DataLoader with a :class:`~lightrft_lightning.sampler.ResumableSampler`.

    Logged per step: ``staleness/mean``, ``staleness/steps_max`` and ``staleness/frac_<s>`` (the fraction of
    samples ``s`` steps stale, ``s`` = 0 .. ``max_off_policy_steps``; a sample's staleness: the learner's step
    - the oldest weight version among its tokens); ``async/learner_wait_s`` (the learner waiting for its
    batch), ``async/engine_idle_s`` (the producer with nothing to generate, since the last step),
    ``rollout/sync_s`` (the push). ``in_flight="keep"`` adds ``staleness/token_mean``, ``staleness/token_max``
    (per token) and ``async/mixed_frac`` (the fraction of samples spanning versions); ``"abort"`` adds
    ``async/aborted`` (samples aborted by the pushes since the last step, generated again).

    Args:
        max_off_policy_steps: how many weight versions a trained sample may lag the learner; 0: the
            synchronous :class:`Rollout`, exactly (any engine). Off-policy (>= 1), the learner corrects with
            importance weights (``rollout_is="token"`` unless a correction is set).
        wait_timeout_s: the longest the learner waits for one batch before it raises.
        in_flight: what a weight push does to the requests generating: "finish" (default: the push waits for
            the batch), "keep" (they continue on the new weights: partial rollouts) or "abort" (generated again
            on the new weights); see the module docstring. "keep" and "abort" need an engine that offers them
            (``VLLMServerEngine``).
        **kwargs: :class:`~lightrft_lightning.algorithms.rollout.Rollout`'s.
    """

    def __init__(self, max_off_policy_steps: int = 1, wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S,
                 in_flight: str = "finish", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_off_policy_steps, self.wait_timeout_s = max_off_policy_steps, wait_timeout_s
        self.in_flight = in_flight
        self._producer: Optional[_Producer] = None
        self._pipeline: list[_Batch] = []  # handed to the producer, not trained, oldest first
        self._restored: Optional[list[list[dict[str, Any]]]] = None
        self._callback = AsyncRolloutCallback(self)

    def check(self, owner: str) -> None:
        super().check(owner)
        value = self.max_off_policy_steps
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{owner}.max_off_policy_steps={value!r} is invalid; accepted: an integer >= 0 "
                             "(0: synchronous)")
        value = self.wait_timeout_s
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ValueError(f"{owner}.wait_timeout_s={value!r} is invalid; accepted: a number of seconds > 0")
        check_in_flight(self.in_flight, f"{owner}(AsyncRollout)")
        if self.in_flight != "finish" and not self.off_policy:
            raise ValueError(f"{owner}.in_flight={self.in_flight!r} is only used by an asynchronous rollout, and "
                             "max_off_policy_steps=0; accepted: max_off_policy_steps >= 1, or in_flight='finish'")

    @property
    def off_policy(self) -> bool:
        return self.max_off_policy_steps > 0

    def callbacks(self) -> list[pl.Callback]:
        return [self._callback] if self.off_policy else []

    @torch.no_grad()
    def __call__(self, module: pl.LightningModule, rows: list[dict[str, Any]]) -> tuple[Experience, dict[str, float]]:
        if not self.off_policy:
            return super().__call__(module, rows)
        from lightrft_lightning.callbacks import find_rollout_callback

        callback = find_rollout_callback(module.trainer)
        start = time.perf_counter()
        if self._producer is None:
            self._start(module, callback)
        with self._producer.between_batches() if self.in_flight == "finish" else contextlib.nullcontext():
            callback.sync_weights(module)
        restored, self._restored = self._restored or [], None  # a resumed run's pipeline, on the new weights
        for batch_rows in [*restored, rows]:
            self._hand_over(batch_rows)
        self._fill(module)
        batch = self._producer.result(self.wait_timeout_s)
        self._pipeline.pop(0)
        sync_s = callback.stats.get("sync_s", 0.0)
        waited = time.perf_counter() - start - sync_s  # for the batch in flight (before the push) and for its own
        exp, metrics = self.score(module, batch.rows, batch.prompts, batch.prompt_ids, batch.completions,
                                  batch.generate_s)
        step = module.trainer.global_step
        versions = [min(c.versions) if c.versions else batch.version for c in batch.completions]
        exp.versions = torch.tensor(versions, dtype=torch.long, device=exp.rewards.device)
        stale = [step - v for v in versions]
        if not all(0 <= s <= self.max_off_policy_steps for s in stale):
            raise RuntimeError(f"a sample generated by weights of step {min(versions)} reached the learner at step "
                               f"{step}: more than max_off_policy_steps={self.max_off_policy_steps} behind")
        metrics.update({"staleness/mean": sum(stale) / len(stale), "staleness/steps_max": float(max(stale)),
                        **{f"staleness/frac_{s}": stale.count(s) / len(stale)
                           for s in range(self.max_off_policy_steps + 1)},
                        "async/learner_wait_s": waited, "async/engine_idle_s": self._producer.take_idle(),
                        "rollout/sync_s": sync_s, **self._in_flight_metrics(step, batch.completions)})
        return exp, metrics

    def _in_flight_metrics(self, step: int, completions: list[Completion]) -> dict[str, float]:
        if self.in_flight == "keep":
            tokens = [step - v for c in completions for v in c.versions]
            return {"staleness/token_mean": sum(tokens) / max(1, len(tokens)),
                    "staleness/token_max": float(max(tokens, default=0)),
                    "async/mixed_frac": sum(len(set(c.versions)) > 1 for c in completions) / len(completions)}
        if self.in_flight == "abort":
            return {"async/aborted": float(self._producer.engine.take_aborted())}
        return {}

    # ------------------------------------------------------------------ the pipeline
    def _start(self, module: pl.LightningModule, callback: Any) -> None:
        engine = callback.engine
        if not getattr(engine, "separate_devices", False):
            raise ValueError(f"{type(module).__name__}: AsyncRollout(max_off_policy_steps={self.max_off_policy_steps}) "
                             f"overlaps generation with training, which needs an engine on devices of its own, and "
                             f"{type(engine).__name__} shares the trainer's (a colocated engine cannot generate while "
                             "the learner trains); accepted: engine_type='vllm_server' (RolloutEngineCallback), or "
                             "max_off_policy_steps=0 (synchronous)")
        if self.in_flight not in engine.in_flight_modes:
            raise ValueError(f"{type(module).__name__}: AsyncRollout(in_flight={self.in_flight!r}) needs an engine "
                             f"that can pause with requests in flight, and {type(engine).__name__} cannot; accepted: "
                             "in_flight='finish', or engine_type='vllm_server' (VLLMServerEngine)")
        if self.in_flight != "finish":
            engine.set_in_flight(self.in_flight)
        self._sampler(module)
        engine.wake_up()  # bookkeeping only: a server's memory is not the trainer's
        self._producer = _Producer(engine, self.sampling_params())

    def _hand_over(self, rows: list[dict[str, Any]]) -> None:
        prompts, prompt_ids = self.render(rows)
        batch = _Batch(list(rows), prompts, prompt_ids)
        self._pipeline.append(batch)
        self._producer.submit(batch)

    def _fill(self, module: pl.LightningModule) -> None:
        """Up to ``max_off_policy_steps + 1`` batches in the pipeline, drawn from the training sampler (every
        rank draws as many: the sampler's stream is split over ranks)."""
        sampler = self._sampler(module)
        size = len(self._pipeline[-1].rows)
        while len(self._pipeline) <= self.max_off_policy_steps:
            if sampler.rows_left() < size:
                break  # the epoch's last prompts: the pipeline runs shorter until the next epoch's batches
            self._hand_over(sampler.draw_rows(size))

    def _sampler(self, module: pl.LightningModule) -> Any:
        return training_sampler(module.trainer, "an asynchronous rollout (AsyncRollout) fills its pipeline with prompts",
                                "max_off_policy_steps=0")

    def stop(self) -> None:
        """Stop the producer (the end of ``fit``, or an exception); the pipeline's rows stay for a checkpoint."""
        if self._producer is not None:
            self._producer.stop(timeout_s=getattr(self._producer.engine, "timeout_s", 60.0) + 10.0)
            self._producer = None
            self._restored, self._pipeline = [b.rows for b in self._pipeline], []

    # ------------------------------------------------------------------ checkpoints
    def pending_rows(self) -> list[list[dict[str, Any]]]:
        """The rows of each batch in the pipeline (handed to the producer, not trained), oldest first."""
        return [b.rows for b in self._pipeline] if self._producer is not None else list(self._restored or [])

    def restore(self, batches: list[list[dict[str, Any]]]) -> None:
        """Batches to generate first when the pipeline starts (a resumed run's)."""
        if self._producer is not None:
            raise RuntimeError("AsyncRollout.restore: the pipeline is already running")
        self._restored = [list(rows) for rows in batches]


class AsyncRolloutCallback(pl.Callback):
    """Stops :class:`AsyncRollout`'s producer with ``fit`` (and on an exception), and keeps the rows in its
    pipeline in the Trainer's checkpoints (every rank's: gathered), so that a resumed run trains them."""

    def __init__(self, rollout: AsyncRollout) -> None:
        self.rollout = rollout

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rollout.stop()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.rollout.stop()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.rollout.stop()

    def state_dict(self) -> dict[str, Any]:
        import torch.distributed as dist

        mine = json.dumps(self.rollout.pending_rows())
        if dist.is_initialized() and dist.get_world_size() > 1:
            pending: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(pending, mine)
        else:
            pending = [mine]
        return {"pending": pending}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        import torch.distributed as dist

        pending = state_dict["pending"]
        world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
        if len(pending) != world:
            raise ValueError(f"AsyncRollout: the checkpoint's pipeline was saved on {len(pending)} ranks and this run "
                             f"has {world}; accepted: resume an asynchronous run on as many ranks as it was saved on")
        self.rollout.restore(json.loads(pending[rank]))

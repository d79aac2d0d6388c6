"""Asynchronous rollouts (AsyncRollout) on one vLLM server, the real SmolLM2-135M-Instruct, fp32, one run:

1. GRPO steps/s with ``max_off_policy_steps`` 0 (synchronous), 1 (one-step-off), 2 and 4, each phase's mean
   time and the idle time of each side, on the machine's cores as they are (shared);
2. the same with the server pinned to core 0 and the learner to core 1 (``--pin``: the whole server session
   and every learner thread, ``taskset -a``), the closest this machine gets to devices of their own;
3. the model: from the synchronous run's times, generation ``G`` and everything else of a step ``L`` (push,
   scoring, training), a pipeline whose sides overlap steps ``max(G, L)`` instead of ``G + L``: predicted
   speedup ``(G + L) / max(G, L)``, next to each measured ratio (of the same table's synchronous run);
4. ``--reward-steps N``: the reward over N steps of synchronous and one-step-off GRPO (the correction on).

    HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 DS_ACCELERATOR=cpu PYTHONPATH=. \\
        .venv-vllm/bin/python bench/bench_async.py [--steps 5] [--pin] [--reward-steps 16]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lightrft_lightning.engines.server import VLLMServerEngine  # noqa: E402
from lightrft_lightning.pretrained import resolve  # noqa: E402
from tests.vllm.common import set_env  # noqa: E402
from tests.vllm.servers import served  # noqa: E402
from bench_server import grpo_times  # noqa: E402  (same folder: run as python bench/bench_async.py)

BUCKET = 64 << 20
OFF_POLICY = (0, 1, 2, 4)


def grpo(engine: VLLMServerEngine, steps: int, off_policy: int, lr: float = 1e-5) -> dict[str, float | list]:
    """``steps`` GRPO steps (one process, ``LightRFTFake``): steps/s after the first (warm-up) step, each
    phase's mean seconds over the same steps, and the reward of every step."""
    times = grpo_times(engine, steps, prompts=256, actor_learning_rate=lr, max_off_policy_steps=off_policy)
    timed = times.metrics[1:]
    mean = lambda key: sum(m.get(key, 0.0) for m in timed) / len(timed)  # noqa: E731
    wall = (times.ends[-1] - times.ends[0]) / len(timed)
    generate = mean("rollout/generate_s") if off_policy == 0 else mean("time/generate")
    out = {"steps/s": 1 / wall, "wall": wall, "generate": generate, "push": mean("rollout/sync_s"),
           "score+train": mean("time/score") + mean("time/train"), "rewards": [m["reward"] for m in times.metrics],
           "staleness": [m.get("staleness/steps_max", 0.0) for m in times.metrics]}
    if off_policy == 0:  # each side idles while the other works
        out["learner_idle"], out["engine_idle"] = generate, wall - generate
    else:
        out["learner_idle"], out["engine_idle"] = mean("async/learner_wait_s"), mean("async/engine_idle_s")
    return out


def pin(pids: list[int], cores: str) -> None:
    """Every thread of ``pids`` onto ``cores`` (``taskset -a -p``)."""
    for pid in pids:
        subprocess.run(["taskset", "-a", "-p", "-c", cores, str(pid)], check=True, capture_output=True)


def session_pids(pid: int) -> list[int]:
    """The processes of ``pid``'s session (a server: API server, engine core, workers)."""
    sid = os.getsid(pid)
    out = subprocess.run(["ps", "-e", "-o", "pid=,sid="], check=True, capture_output=True, text=True).stdout
    return [int(p) for p, s in (line.split() for line in out.splitlines()) if int(s) == sid]


def table(engine: VLLMServerEngine, steps: int, title: str) -> None:
    rows = {k: grpo(engine, steps, k) for k in OFF_POLICY}
    sync = rows[0]
    g, rest = sync["generate"], sync["wall"] - sync["generate"]
    predicted = (g + rest) / max(g, rest)
    print(f"\n{title}: {steps} steps each, timed after the first; G={g:.2f} s, L={rest:.2f} s "
          f"(synchronous run): predicted speedup with sides of their own {predicted:.2f}x")
    print("| max_off_policy_steps | steps/s | measured / sync | predicted | generate s | push s | score+train s "
          "| learner idle s/step | engine idle s/step | staleness per step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for k, r in rows.items():
        print(f"| {k} | {r['steps/s']:.3f} | {r['steps/s'] / sync['steps/s']:.2f} | {1.0 if k == 0 else predicted:.2f} "
              f"| {r['generate']:.2f} | {r['push']:.2f} | {r['score+train']:.2f} | {r['learner_idle']:.2f} "
              f"| {r['engine_idle']:.2f} | {[int(s) for s in r['staleness']]} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5, help="GRPO steps per setting (>= 2; the first is warm-up), "
                        "0: no speed table")
    parser.add_argument("--pin", action="store_true", help="also the table with the server on core 0, the learner "
                        "on core 1")
    parser.add_argument("--reward-steps", type=int, default=0, help="the reward over this many steps, synchronous "
                        "vs one-step-off (0: off)")
    args = parser.parse_args()
    if args.steps == 1 or args.steps < 0 or args.reward_steps < 0:
        parser.error("--steps: 0 or >= 2; --reward-steps: >= 0")
    set_env()
    path = resolve("smollm2-135m-instruct")
    cores = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    with served(path, count=1, args=["--dtype", "float32", "--max-model-len", "1024"]) as servers:
        engine = VLLMServerEngine([servers[0].url], timeout_s=300)
        try:
            if args.steps:
                table(engine, args.steps, f"shared cores ({cores})")
            if args.pin:
                pin(session_pids(servers[0].process.pid), "0")
                pin([os.getpid()], "1")
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    table(engine, args.steps, "server pinned to core 0, learner to core 1 (1 torch thread)")
                finally:
                    torch.set_num_threads(threads)
                    pin(session_pids(servers[0].process.pid) + [os.getpid()], cores)
            if args.reward_steps:
                runs = {k: grpo(engine, args.reward_steps, k, lr=2e-5) for k in (0, 1)}
                print(f"\nreward per step over {args.reward_steps} steps (arithmetic, lr 2e-5, TIS on when off-policy)")
                for k, r in runs.items():
                    first, last = r["rewards"][: len(r["rewards"]) // 2], r["rewards"][len(r["rewards"]) // 2:]
                    print(f"max_off_policy_steps={k}: first half mean {sum(first) / len(first):.3f}, second half "
                          f"mean {sum(last) / len(last):.3f}; per step {[round(x, 3) for x in r['rewards']]}",
                          flush=True)
        finally:
            engine.close()


if __name__ == "__main__":
    main()

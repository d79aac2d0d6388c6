"""Exact resume with DCPCheckpoint on 2 gloo ranks, under LightRFTFSDP or LightRFTDeepSpeed:
4 steps straight vs 2 steps, then a fresh run (other initial weights) that resumes from ``latest``
and trains steps 3-4 (with ASYNC=1, saves use DCP's async_save). Rank 0 prints ``RESUME {json}`` with the losses and the max parameter
difference. With KILL=<point> rank 1 SIGKILLs itself during the save at step 4 (``write``: as
its shards are written, ``publish``: after writing, before ``latest`` moves) to test atomicity.

Usage: ckpt_resume.py {fsdp,deepspeed} DIR [straight|first|resume|all]
"""

import json
import os
import signal
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from ckpt_common import LossRecorder, NoisyLM, params, prompts
from lightrft_lightning.callbacks.dcp_checkpoint import DCPCheckpoint

CONFIG = {"train_batch_size": 4, "micro_train_batch_size": 1, "bf16": False, "max_norm": 1.0,
          "dist_timeout_minutes": 1.0, "fsdp": True, "zero_stage": 2}


def strategy(name: str):
    if name == "fsdp":
        from lightrft_lightning.strategies.fsdp import LightRFTFSDP

        return LightRFTFSDP(CONFIG)
    from lightrft_lightning.strategies.deepspeed import LightRFTDeepSpeed

    return LightRFTDeepSpeed(CONFIG)


def arm_kill(point: str) -> None:
    """SIGKILL rank 1 during the save of step 4."""
    if int(os.environ["RANK"]) != 1:
        return
    import lightrft_lightning.checkpoint.publish as module

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "publish":
        real = module.place

        def place(tmp, final, *args, **kwargs):
            die() if final.name == "global_step4" else real(tmp, final, *args, **kwargs)

        module.place = place
    else:  # "write": while the shards are written
        from torch.distributed.checkpoint.filesystem import FileSystemWriter

        real_write = FileSystemWriter.write_data

        def write_data(self, plan, planner):
            if "global_step4" in str(self.path):
                die()
            return real_write(self, plan, planner)

        FileSystemWriter.write_data = write_data


def fit(name: str, max_steps: int, dirpath: Path, seed: int = 0):
    pl.seed_everything(123, verbose=False)
    module = NoisyLM(seed=seed)
    recorder = LossRecorder()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy(name), max_steps=max_steps, logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[recorder, DCPCheckpoint(dirpath, every_n_train_steps=2,
                                                              async_save=bool(os.environ.get("ASYNC")))])
    trainer.fit(module, prompts())
    return module, recorder.losses, trainer


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    name, root, phase = sys.argv[1], Path(sys.argv[2]), (sys.argv[3] if len(sys.argv) > 3 else "all")
    if os.environ.get("KILL"):
        arm_kill(os.environ["KILL"])
    out = {}
    if phase in ("straight", "all"):
        module, out["straight"], _ = fit(name, 4, root / "a")
        straight = params(module.actor)  # a collective under FSDP: every rank gathers
        if int(os.environ["RANK"]) == 0:
            torch.save(straight, root / "straight.pt")
    if phase in ("first", "all"):
        _, out["first"], _ = fit(name, 4 if os.environ.get("KILL") else 2, root / "b")
    if phase in ("resume", "all"):
        module, out["resumed"], trainer = fit(name, 4, root / "b", seed=99)
        cb = next(c for c in trainer.callbacks if isinstance(c, DCPCheckpoint))
        out["resumed_from"] = cb.resumed_from
        final = params(module.actor)
        if int(os.environ["RANK"]) == 0:
            reference = torch.load(root / "straight.pt", weights_only=True)
            out["max_param_diff"] = max(float((final[k] - reference[k]).abs().max()) for k in reference)
    if int(os.environ["RANK"]) == 0:
        print("RESUME " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()

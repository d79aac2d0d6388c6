"""All 2-rank LightRFTDeepSpeed checks in one torchrun launch (imports dominate a launch's time):
equivalence runs (ds_train), standalone checkpoints and HF export (ds_ckpt), Trainer fit/resume
(ds_trainer), models built partitioned under ZeRO-3 (zero3_init). Rank 0 prints ``RESULT {json}``.

    PYTHONPATH=. torchrun --nproc_per_node=2 tests/scripts/ds_suite.py OUT_DIR   (from the repository root)
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
import ds_ckpt  # noqa: E402
import ds_train  # noqa: E402
import ds_trainer  # noqa: E402
import zero3_init  # noqa: E402

from tests.launch import report  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    for stage in (1, 2, 3):
        ds_train.run("deepspeed", stage, "lightrft", str(out / "train" / f"deepspeed-z{stage}-lightrft"))
    ds_train.run("deepspeed", 3, "openrlhf", str(out / "train" / "deepspeed-z3-openrlhf"))
    summary = {"ckpt": {f"z{stage}": ds_ckpt.check(stage, out / "ckpt") for stage in (1, 3)},
               "trainer": {name: ds_trainer.check(name, str(out / "trainer"))
                           for name in ("lightrft_deepspeed", "lightrft_deepspeed_stage_3")},
               "zero3_init": zero3_init.check(str(out / "zero3_init"))}
    report(summary)


if __name__ == "__main__":
    main()

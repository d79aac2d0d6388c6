"""A peer that dies mid-training: 2 ranks (launched as plain processes, not torchrun, so rank 0 is
not killed by the launcher) train LightRFTFSDP with ``dist_timeout_minutes`` from argv; rank 1
SIGKILLs itself after the first step. Rank 0 must fail with an error instead of hanging.

Usage: RANK=r WORLD_SIZE=2 MASTER_ADDR=... MASTER_PORT=... ckpt_peer_death.py TIMEOUT_MINUTES
"""

import os
import signal
import sys
import time

import torch

from lightrft_lightning import get_strategy
from lightrft_lightning.tiny_models import tiny_causal_lm

IDS = torch.arange(12).view(2, 6)


def main(timeout_minutes: float) -> None:
    strategy = get_strategy(dict(strategy="fsdp", fsdp=True, bf16=False, micro_train_batch_size=1, train_batch_size=2,
                                 dist_timeout_minutes=timeout_minutes))
    strategy.setup_distributed()
    model = tiny_causal_lm(seed=0)
    model, optimizer, _ = strategy.prepare((model, strategy.create_optimizer(model), None))
    for step in range(20):
        if step == 1 and strategy.dp_rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == 1:
            print(f"PEER_DEATH rank0 step1 at {time.time()}", flush=True)
        loss = model(input_ids=IDS, labels=IDS).loss
        strategy.backward(loss, model, optimizer)
        strategy.optimizer_step(optimizer, model, None)
        strategy.all_reduce(float(loss))
    print("PEER_DEATH finished without noticing", flush=True)


if __name__ == "__main__":
    main(float(sys.argv[1]))

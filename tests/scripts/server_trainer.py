"""``Trainer(strategy=LightRFTFSDP | LightRFTDeepSpeed(ZeRO-3))`` on 2 CPU ranks with a
``RolloutEngineCallback`` that builds a ``VLLMServerEngine`` on each rank (``StrategyConfig.engine_type=
"vllm_server"``, the URLs in ``engine_kwargs``) over real vLLM servers, fed from the sharded actor through
the gloo weight-transfer backend (rank 0 sends, once to all servers). Each step: a greedy rollout (n=2, a
different prompt set per rank, spread over the servers) compared token for token with the sharded actor's
own greedy decode, and the engine's log-probs with the actor's; then a training step. Rank 0 prints
``RESULT {json}``.

    PYTHONPATH=. torchrun --nproc_per_node=2 tests/scripts/server_trainer.py {fsdp|deepspeed} MODEL_DIR URL[,URL] \
        [{full|merged|adapter}]

``merged`` / ``adapter``: a LoRA actor, its merged weights or its adapter alone sent to the servers.
"""

import os
import sys
import warnings

import torch

from lightrft_lightning.callbacks import RolloutEngineCallback
from lightrft_lightning.engines.server import VLLMServerEngine
from tests.scripts.vllm_trainer import Rollouts, fit, gather_and_report
from tests.vllm.common import set_env

CONFIG = dict(bf16=False, train_batch_size=2, micro_train_batch_size=1, max_norm=0.0, zero_stage=3,
              dist_timeout_minutes=2.0, engine_type="vllm_server")
STEPS = 2


def main(backend: str, model_dir: str, urls: list[str], weights: str = "full") -> None:
    model = Rollouts(model_dir, steps=STEPS, lora=weights != "full")
    lora = {} if weights == "full" else {"lora": weights}
    callback = RolloutEngineCallback(bucket_bytes=20_000,
                                     engine_kwargs={"urls": urls, "api_key": "test-key", "timeout_s": 120, **lora})
    trainer, engine = fit(backend, model, callback, CONFIG)
    for r in gather_and_report(trainer, model, callback, engine=type(engine).__name__,
                               versions=engine.weight_versions(), urls=engine.urls):
        assert isinstance(engine, VLLMServerEngine) and r["versions"] == [str(STEPS - 1)] * len(urls), r


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    set_env()
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2], sys.argv[3].split(","), *sys.argv[4:])
    os._exit(0)  # vLLM's exit hooks tear down process groups report() already destroyed

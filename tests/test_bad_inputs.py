"""The bad-input table: wrong types, impossible combinations, missing paths and unknown names
across strategies, engines, callbacks, checkpoints, data, algorithms and the CLI. Each row must
raise its exception with a message naming the problem (the field and what is accepted), before
any process group starts. StrategyConfig's own rows live in tests/test_config.py (BAD_CONFIGS).

To add a row: append ``Row(id, thunk, exception, regex)``; ``thunk(tmp_path)`` triggers the error.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any, Callable, NamedTuple

import pytest
import torch.distributed as dist


class Row(NamedTuple):
    id: str
    thunk: Callable[[Path], Any]
    error: type[BaseException]
    match: str


def _fake():
    from lightrft_lightning import LightRFTFake

    return LightRFTFake({"bf16": False})


def _tiny():
    from lightrft_lightning.tiny_models import tiny_causal_lm

    return tiny_causal_lm(num_hidden_layers=1)


def _hf_engine():
    from lightrft_lightning.engines import HFEngine

    return HFEngine(_tiny(), pad_token_id=0)


def _with_env(env: dict[str, str], fn: Callable[[], Any]) -> Any:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return fn()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _cli(*argv: str) -> None:
    """Run the console script; a usage error (SystemExit) becomes a ValueError holding stderr."""
    from lightrft_lightning.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(list(argv))
        except SystemExit as exit_:
            raise ValueError(f"exit {exit_.code}: {err.getvalue()}") from None


def _dcp(**kwargs):
    from lightrft_lightning.callbacks.dcp_checkpoint import DCPCheckpoint

    return DCPCheckpoint(**kwargs)


def _file(tmp_path: Path, name: str = "file.txt", text: str = "x") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _strategy(name: str, **kwargs):
    from lightrft_lightning import get_strategy

    return get_strategy({"strategy": name, "bf16": False, **kwargs})


def _grpo(**kwargs):
    from lightrft_lightning.algorithms import GRPO

    return GRPO(**kwargs)


def _prompts(**kwargs):
    from lightrft_lightning.data import PromptDataModule

    return PromptDataModule(**kwargs)


def _async_on_deepspeed(tmp_path: Path) -> None:
    from lightning.pytorch import Trainer

    from lightrft_lightning.strategies.deepspeed import LightRFTDeepSpeed

    trainer = Trainer(accelerator="cpu", devices=1, strategy=LightRFTDeepSpeed({"bf16": False}), logger=False)
    _dcp(dirpath=tmp_path, async_save=True).setup(trainer, None, "fit")


def _no_rollout_callback(tmp_path: Path) -> None:
    from lightning.pytorch import Trainer

    from lightrft_lightning.callbacks import find_rollout_callback

    find_rollout_callback(Trainer(accelerator="cpu", logger=False, enable_checkpointing=False))


ROWS = [
    # ---------------------------------------------------------------- strategies
    Row("strategy-unknown-name", lambda t: _strategy("megatron"), ValueError, r"strategy='megatron' is unknown; accepted: .*fake"),
    Row("config-from-int", lambda t: __import__("lightrft_lightning").StrategyConfig.from_args(42), TypeError,
        r"cannot read attributes from int; pass an argparse.Namespace, a dict"),
    Row("all-reduce-op", lambda t: _fake().all_reduce(1.0, op="min"), ValueError, r"op='min' is invalid; accepted: 'mean', 'sum', 'max'"),
    Row("fsdp-shard-size-not-divisor", lambda t: _with_env({"WORLD_SIZE": "4"}, _strategy("fsdp", fsdp=True, shard_size=3).setup_distributed),
        ValueError, r"shard_size=3 is invalid for world_size=4; accepted: None .* or a divisor"),
    Row("fsdp-prepare-before-setup", lambda t: _strategy("fsdp", fsdp=True).prepare(_tiny()), RuntimeError,
        r"call setup_distributed\(\) before prepare\(\)"),
    Row("deepspeed-config-missing-file", lambda t: __import__("lightrft_lightning").LightRFTDeepSpeed(ds_config=str(t / "none.json")), FileNotFoundError,
        r"ds_config='.*none.json' is not a file; accepted: a dict or a JSON file path"),
    Row("deepspeed-config-type", lambda t: __import__("lightrft_lightning").LightRFTDeepSpeed(ds_config=3), TypeError,
        r"ds_config must be a dict, a JSON file path or None, got int"),
    Row("register-duplicate-name", lambda t: __import__("lightrft_lightning").register_strategy("fake", lambda c: None), ValueError,
        r"a strategy named 'fake' is already registered \(pass override=True\)"),
    # ---------------------------------------------------------------- engines
    Row("sampling-n", lambda t: __import__("lightrft_lightning.engines").engines.SamplingParams(n=0), ValueError,
        r"SamplingParams.n=0 is invalid; accepted: an integer >= 1"),
    Row("sampling-temperature", lambda t: __import__("lightrft_lightning.engines").engines.SamplingParams(temperature=-1.0),
        ValueError, r"SamplingParams.temperature=-1.0 is invalid; accepted: a number >= 0"),
    Row("sampling-top-p", lambda t: __import__("lightrft_lightning.engines").engines.SamplingParams(top_p=0.0), ValueError,
        r"SamplingParams.top_p=0.0 is invalid; accepted: a number in \(0, 1\]"),
    Row("sampling-top-k", lambda t: __import__("lightrft_lightning.engines").engines.SamplingParams(top_k=0), ValueError,
        r"SamplingParams.top_k=0 is invalid; accepted: -1 \(off\) or an integer >= 1"),
    Row("sampling-max-new-tokens", lambda t: __import__("lightrft_lightning.engines").engines.SamplingParams(max_new_tokens=0),
        ValueError, r"SamplingParams.max_new_tokens=0 is invalid"),
    Row("vllm-no-model", lambda t: __import__("lightrft_lightning.engines").engines.VLLMEngine(), ValueError,
        r"VLLMEngine: pass model= .* or llm="),
    Row("sglang-no-model", lambda t: __import__("lightrft_lightning.engines").engines.SGLangEngine(), ValueError,
        r"SGLangEngine: pass model_path= .* or engine="),
    Row("engine-sleep-level", lambda t: _hf_engine().sleep(level=3), ValueError,
        r"sleep_level=3 is invalid; accepted: 1 \(weights kept in CPU memory\) or 2"),
    Row("engine-wake-tags", lambda t: _hf_engine().wake_up(tags=["gpu"]), ValueError,
        r"tags=\['gpu'\] are invalid; accepted: a subset of"),
    Row("engine-empty-prompts", lambda t: _hf_engine().generate([], __import__("lightrft_lightning.engines").engines.SamplingParams()),
        ValueError, r"prompt_token_ids must be a non-empty list"),
    # ---------------------------------------------------------------- callbacks
    Row("rollout-bucket-bytes", lambda t: __import__("lightrft_lightning.callbacks").callbacks.RolloutEngineCallback(bucket_bytes=0),
        ValueError, r"bucket_bytes=0 is invalid; accepted: an integer >= 1"),
    Row("rollout-callback-missing", _no_rollout_callback, RuntimeError, r"no RolloutEngineCallback in the Trainer's callbacks"),
    Row("dcp-dirpath-empty", lambda t: _dcp(dirpath=""), TypeError, r"DCPCheckpoint.dirpath must be a non-empty path"),
    Row("dcp-dirpath-type", lambda t: _dcp(dirpath=3), TypeError, r"DCPCheckpoint.dirpath must be a non-empty path, got 3"),
    Row("dcp-dirpath-is-file", lambda t: _dcp(dirpath=_file(t)), NotADirectoryError, r"dirpath=.*file.txt' is a file; accepted: a directory"),
    Row("dcp-every-n-negative", lambda t: _dcp(dirpath=t, every_n_train_steps=-1), ValueError,
        r"every_n_train_steps=-1 is invalid; accepted: an integer >= 0"),
    Row("dcp-every-n-float", lambda t: _dcp(dirpath=t, every_n_train_steps=2.5), ValueError, r"every_n_train_steps=2.5 is invalid"),
    Row("dcp-max-num", lambda t: _dcp(dirpath=t, max_num=0), ValueError, r"max_num=0 is invalid; accepted: an integer >= 1"),
    Row("dcp-max-mem", lambda t: _dcp(dirpath=t, max_mem=0), ValueError, r"max_mem=0 is invalid; accepted: a number of GB > 0"),
    Row("dcp-resume-type", lambda t: _dcp(dirpath=t, resume="yes"), TypeError, r"DCPCheckpoint.resume must be a bool, got 'yes'"),
    Row("dcp-async-on-deepspeed", _async_on_deepspeed, ValueError,
        r"async_save=True\) needs a strategy that writes DCP .*LightRFTDeepSpeed writes its own format"),
    # ---------------------------------------------------------------- checkpoints
    Row("load-without-latest", lambda t: _fake().load_ckpt(_tiny(), str(t)), FileNotFoundError,
        r"no checkpoint to load: .*latest does not exist"),
    Row("load-unknown-tag", lambda t: __import__("lightrft_lightning.checkpoint").checkpoint.resolve(str(t), "nope"),
        FileNotFoundError, r"checkpoint .*nope is incomplete: .*nope/.metadata is missing"),
    Row("checkpoint-io-not-dcp", lambda t: __import__("lightrft_lightning.checkpoint").checkpoint.DCPCheckpointIO().load_checkpoint(t),
        FileNotFoundError, r"is not a DCP checkpoint directory: .*\.metadata is missing"),
    # ---------------------------------------------------------------- data
    Row("prompts-none", lambda t: _prompts(), ValueError, r"give exactly one of path= \(a JSONL file\) or prompts="),
    Row("prompts-file-missing", lambda t: _prompts(path=str(t / "p.jsonl")).setup("fit"), FileNotFoundError,
        r"prompt file '.*p.jsonl' does not exist; accepted: a JSONL file"),
    Row("prompts-bad-json", lambda t: _prompts(path=_file(t, "p.jsonl", '{"prompt": "a"}\n{oops\n')).setup("fit"), ValueError,
        r"p.jsonl:2: not valid JSON"),
    Row("prompts-no-prompt-field", lambda t: _prompts(prompts=[{"text": "a"}]).setup("fit"), ValueError,
        r"prompt row 0 has no string field 'prompt'"),
    Row("prompts-batch-size", lambda t: _prompts(prompts=["a"], batch_size=0), ValueError,
        r"PromptDataModule.batch_size=0 is invalid; accepted: an integer >= 1"),
    # ---------------------------------------------------------------- algorithms
    Row("grpo-advantage-estimator", lambda t: _grpo(advantage_estimator="ppo2"), ValueError,
        r"GRPO.advantage_estimator='ppo2' is invalid; accepted: "),
    Row("grpo-kl-coef", lambda t: _grpo(kl_coef=-1.0), ValueError, r"GRPO.kl_coef=-1.0 is invalid; accepted: a number >= 0"),
    Row("grpo-model-path", lambda t: _grpo(model=str(t / "no_model")), ValueError,
        r"model='.*no_model' is neither 'tiny' nor a local directory"),
    Row("grpo-reward-path", lambda t: _grpo(rewards={"not_a_path": 1.0}), ValueError, r"reward 'not_a_path' is not an import path"),
    # ---------------------------------------------------------------- CLI
    Row("cli-unknown-subcommand", lambda t: _cli("fitt"), ValueError, r"invalid choice: 'fitt'"),
    Row("cli-convert-missing-config", lambda t: _cli("convert", "dcp-to-hf", "a", "b"), ValueError,
        r"the following arguments are required: --config"),
    Row("cli-convert-unknown", lambda t: _cli("convert", "torch-to-hf"), ValueError, r"invalid choice: 'torch-to-hf'"),
    Row("cli-unknown-trainer-key", lambda t: _cli("fit", "--trainer.max_stepz", "3"), ValueError, r"max_stepz"),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_is_refused_with_a_clear_message(row, tmp_path):
    with pytest.raises(row.error, match=row.match):
        row.thunk(tmp_path)
    assert not dist.is_initialized(), f"{row.id}: a process group was started before the error"


def test_table_size():
    from tests.test_config import BAD_CONFIGS

    assert len({r.id for r in ROWS}) == len(ROWS) >= 30
    assert len(ROWS) + len(BAD_CONFIGS) >= 60

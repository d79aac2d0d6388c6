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


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


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


def _reward(spec: Any, *completions: str, meta: Any = None, weight: float = 1.0):
    """Build ``CombinedReward({spec: weight})`` and score ``completions`` (default: two)."""
    from lightrft_lightning.algorithms import CombinedReward

    completions = completions or ("a", "b")
    return CombinedReward({spec: weight})(["p"] * len(completions), list(completions), meta)


def raising_reward(prompts, completions, metadata):
    """A reward that fails the way a rule written for other data does."""
    return [float(m["answer"] == c) for c, m in zip(completions, metadata)]


def nan_reward(prompts, completions, metadata):
    return [float("nan")] + [0.0] * (len(completions) - 1)


def inf_reward(prompts, completions, metadata):
    return [0.0] * (len(completions) - 1) + [float("-inf")]


def short_reward(prompts, completions, metadata):
    return [1.0]


def scalar_reward(prompts, completions, metadata):
    return 1.0


def _counting(**kwargs):
    from lightrft_lightning.tasks import counting_prompts

    return counting_prompts(**kwargs)


def _tokenizer(*args: Any):
    from lightrft_lightning.tokenizer import load_tokenizer

    return load_tokenizer(*args)


def _tokenizer_without_pad_or_eos(tmp_path: Path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "?": 1}, unk_token="?")),
                            unk_token="?").save_pretrained(tmp_path)
    return _tokenizer(str(tmp_path))


def _hf_config_dir(tmp_path: Path) -> str:
    """A directory holding a config.json (its content is never read before the output check)."""
    _file(tmp_path, "config.json", "{}")
    return str(tmp_path)


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
    Row("deepspeed-config-not-json", lambda t: __import__("lightrft_lightning").LightRFTDeepSpeed(ds_config=_write(t / "ds.json", "{stage: 2")),
        ValueError, r"ds_config='.*ds.json' is not valid JSON \(.*line 1.*\); accepted: a dict or a JSON file path"),
    Row("deepspeed-config-not-object", lambda t: __import__("lightrft_lightning").LightRFTDeepSpeed(ds_config=_write(t / "ds.json", "[1, 2]")),
        ValueError, r"ds_config='.*ds.json' holds a list, not a JSON object"),
    Row("deepspeed-clip-by-value", lambda t: __import__("lightrft_lightning.strategies.deepspeed", fromlist=["x"]).EngineClippingPrecision(
        "32-true").clip_gradients(None, 1.0, __import__("lightning.pytorch.utilities", fromlist=["x"]).GradClipAlgorithmType.VALUE),
        ValueError, r"gradient_clip_algorithm='value' is not supported \(DeepSpeed clips by norm\); accepted: 'norm'"),
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
    Row("prompts-batch-size-float", lambda t: _prompts(prompts=["a"], batch_size=2.5), ValueError,
        r"PromptDataModule.batch_size=2.5 is invalid; accepted: an integer >= 1"),
    Row("prompts-file-is-directory", lambda t: _prompts(path=str(t)), IsADirectoryError,
        r"prompt file '.*' is a directory; accepted: a JSONL file"),
    Row("prompts-jsonl-row-not-object", lambda t: _prompts(path=_file(t, "p.jsonl", '{"prompt": "a"}\n[1, 2]\n')).setup("fit"),
        ValueError, r"p.jsonl:2 \(list \[1, 2\]\) is invalid; accepted: a string or a mapping with a string 'prompt'"),
    Row("prompts-jsonl-no-prompt-field", lambda t: _prompts(path=_file(t, "p.jsonl", '{"prompt": "a"}\n\n{"text": "b"}\n'))
        .setup("fit"), ValueError, r"p.jsonl:3 has no string field 'prompt'; accepted: .*\(got keys \['text'\]\)"),
    Row("prompts-jsonl-empty", lambda t: _prompts(path=_file(t, "p.jsonl", "\n\n")).setup("fit"), ValueError,
        r"prompt file '.*p.jsonl' holds no prompts"),
    Row("prompts-jsonl-not-utf8", lambda t: (t / "p.jsonl").write_bytes(b'{"prompt": "a"}\n\xff\xfe\n')
        and _prompts(path=str(t / "p.jsonl")).setup("fit"), ValueError, r"p.jsonl:2: not UTF-8 text"),
    Row("prompts-row-type", lambda t: _prompts(prompts=["a", 3]).setup("fit"), ValueError,
        r"prompt row 1 \(int 3\) is invalid; accepted: a string or a mapping"),
    Row("prompts-a-string", lambda t: _prompts(prompts="hello"), ValueError,
        r"PromptDataModule.prompts='hello' is invalid; accepted: a non-empty list of strings or rows"),
    Row("prompts-empty-list", lambda t: _prompts(prompts=[]), ValueError,
        r"PromptDataModule.prompts=\[\] is invalid; accepted: a non-empty list"),
    Row("prompts-val-both", lambda t: _prompts(prompts=["a"], val_path=_file(t), val_prompts=["b"]), ValueError,
        r"give at most one of val_path= \(a JSONL file\) or val_prompts="),
    Row("prompts-val-file-missing", lambda t: _prompts(prompts=["a"], val_path=str(t / "v.jsonl")), FileNotFoundError,
        r"prompt file '.*v.jsonl' does not exist"),
    Row("prompts-prompt-key", lambda t: _prompts(prompts=["a"], prompt_key=""), ValueError,
        r"PromptDataModule.prompt_key='' is invalid; accepted: a non-empty string"),
    # ---------------------------------------------------------------- algorithms
    Row("grpo-advantage-estimator", lambda t: _grpo(advantage_estimator="ppo2"), ValueError,
        r"GRPO.advantage_estimator='ppo2' is invalid; accepted: "),
    Row("grpo-kl-coef", lambda t: _grpo(kl_coef=-1.0), ValueError, r"GRPO.kl_coef=-1.0 is invalid; accepted: a number >= 0"),
    Row("grpo-model-path", lambda t: _grpo(model=str(t / "no_model")), ValueError,
        r"model='.*no_model' is neither a built-in name nor a local directory nor a hub id; accepted: "
        r"'smollm2-135m-instruct', the path of a Hugging Face model directory, or a hub id .*; or 'tiny'"),
    Row("grpo-model-hub-id-unreachable", lambda t: _grpo(model="lightrft-lightning-tests/no-such-model"), ValueError,
        r"model='lightrft-lightning-tests/no-such-model' is not a local directory, and as a hub id it could not be "
        r"fetched from the Hugging Face hub nor found in its local cache \(.*\); accepted: a built-in name"),
    Row("grpo-val-temperature-without-samples", lambda t: _grpo(val_temperature=0.5), ValueError,
        r"GRPO.val_temperature=0.5 is only used with val_samples >= 1"),
    Row("grpo-val-samples-negative", lambda t: _grpo(val_samples=-1), ValueError,
        r"GRPO.val_samples=-1 is invalid; accepted: an integer >= 0"),
    Row("grpo-model-config-with-a-real-model", lambda t: _grpo(model=str(t), model_config={"hidden_size": 8}),
        ValueError, r"model_config=\{'hidden_size': 8\} is only for model='tiny'"),
    Row("grpo-reward-path", lambda t: _grpo(rewards={"not_a_path": 1.0}), ValueError, r"reward 'not_a_path' is not an import path"),
    Row("grpo-group-norm-one-sample", lambda t: _grpo(n_samples_per_prompt=1), ValueError,
        r"GRPO.n_samples_per_prompt=1 is invalid for GRPO.advantage_estimator='group_norm' .*accepted: "
        r"n_samples_per_prompt >= 2, or advantage_estimator='reinforce\+\+'"),
    Row("grpo-dr-grpo-one-sample", lambda t: _grpo(n_samples_per_prompt=1, advantage_estimator="dr_grpo"), ValueError,
        r"GRPO.n_samples_per_prompt=1 is invalid for GRPO.advantage_estimator='dr_grpo' .*accepted: n_samples_per_prompt >= 2"),
    Row("grpo-rloo-one-sample", lambda t: _grpo(n_samples_per_prompt=1, advantage_estimator="rloo"), ValueError,
        r"GRPO.n_samples_per_prompt=1 is invalid for GRPO.advantage_estimator='rloo' .*accepted: n_samples_per_prompt >= 2"),
    Row("grpo-reinforce-baseline-one-sample",
        lambda t: _grpo(n_samples_per_prompt=1, advantage_estimator="reinforce++_baseline"), ValueError,
        r"GRPO.n_samples_per_prompt=1 is invalid for GRPO.advantage_estimator='reinforce\+\+_baseline' .*accepted: "
        r"n_samples_per_prompt >= 2"),
    Row("advantages-group-one-sample", lambda t: __import__("lightrft_lightning.algorithms").algorithms.compute_advantages(
        "group_norm", __import__("torch").ones(2), __import__("torch").ones(2, 1), 1), ValueError,
        r"^n_samples_per_prompt=1 is invalid for advantage_estimator='group_norm' \(a group of one sample has advantage 0\)"),
    Row("group-norm-one-sample", lambda t: __import__("lightrft_lightning.algorithms").algorithms.group_norm(
        __import__("torch").ones(2), 1, std_normalize=False), ValueError,
        r"n_samples_per_prompt=1 is invalid for advantage_estimator='dr_grpo'"),
    Row("grpo-n-samples-float", lambda t: _grpo(n_samples_per_prompt=2.5), ValueError,
        r"GRPO.n_samples_per_prompt=2.5 is invalid; accepted: an integer >= 1"),
    Row("grpo-max-new-tokens-str", lambda t: _grpo(max_new_tokens="4"), ValueError,
        r"GRPO.max_new_tokens='4' is invalid; accepted: an integer >= 1"),
    Row("grpo-train-batch-size", lambda t: _grpo(train_batch_size=0), ValueError,
        r"GRPO.train_batch_size=0 is invalid; accepted: an integer >= 1"),
    Row("grpo-kl-coef-nan", lambda t: _grpo(kl_coef=float("nan")), ValueError,
        r"GRPO.kl_coef=nan is invalid; accepted: a number >= 0 \(finite\)"),
    Row("grpo-temperature-nan", lambda t: _grpo(temperature=float("nan")), ValueError,
        r"GRPO.temperature=nan is invalid; accepted: a number >= 0"),
    Row("grpo-learning-rate", lambda t: _grpo(actor_learning_rate=-1e-6), ValueError,
        r"GRPO.actor_learning_rate=-1e-06 is invalid; accepted: a number >= 0"),
    Row("ppo-epochs", lambda t: __import__("lightrft_lightning.algorithms").algorithms.PPO(epochs=0), ValueError,
        r"PPO.epochs=0 is invalid; accepted: an integer >= 1"),
    Row("grpo-rewards-empty", lambda t: _grpo(rewards={}), ValueError,
        r"CombinedReward.rewards=\{\} is empty; accepted: a mapping of 'module:function'"),
    Row("grpo-reward-weight-negative", lambda t: _grpo(rewards={"lightrft_lightning.tasks:counting_reward": -1.0}),
        ValueError, r"CombinedReward.rewards\['lightrft_lightning.tasks:counting_reward'\]=-1.0 is invalid; accepted: "
        r"a finite number >= 0"),
    Row("grpo-tokenizer-chars-empty", lambda t: _grpo(tokenizer_chars=""), ValueError,
        r"tokenizer_chars='' is invalid; accepted: None or a non-empty string"),
    Row("grpo-tokenizer-chars-with-directory", lambda t: _grpo(tokenizer=str(t), tokenizer_chars="01"), ValueError,
        r"tokenizer_chars='01' is invalid with tokenizer='.*'; accepted: None \(the characters are only for"),
    # ---------------------------------------------------------------- rewards
    Row("reward-weight-nan", lambda t: _reward("lightrft_lightning.tasks:counting_reward", weight=float("nan")),
        ValueError, r"CombinedReward.rewards\['lightrft_lightning.tasks:counting_reward'\]=nan is invalid; accepted: "
        r"a finite number >= 0"),
    Row("reward-weight-inf", lambda t: _reward("lightrft_lightning.tasks:counting_reward", weight=float("inf")),
        ValueError, r"rewards\['lightrft_lightning.tasks:counting_reward'\]=inf is invalid"),
    Row("reward-weight-string", lambda t: _reward("lightrft_lightning.tasks:counting_reward", weight="1.0"),
        ValueError, r"rewards\['lightrft_lightning.tasks:counting_reward'\]='1.0' is invalid; accepted: a finite number"),
    Row("rewards-not-a-mapping", lambda t: __import__("lightrft_lightning.algorithms").algorithms.CombinedReward(
        ["lightrft_lightning.tasks:counting_reward"]), TypeError,
        r"CombinedReward.rewards=\['lightrft_lightning.tasks:counting_reward'\] is invalid; accepted: a mapping"),
    Row("reward-spec-type", lambda t: _reward(3), TypeError,
        r"CombinedReward.rewards key 3 \(int\) is invalid; accepted: 'package.module:function'"),
    Row("reward-module-missing", lambda t: _reward("no_such_module_xyz:score"), ValueError,
        r"reward 'no_such_module_xyz:score' cannot be imported: module 'no_such_module_xyz' fails to import "
        r"\(ModuleNotFoundError"),
    Row("reward-function-missing", lambda t: _reward("lightrft_lightning.tasks:nope"), ValueError,
        r"reward 'lightrft_lightning.tasks:nope' cannot be imported: module 'lightrft_lightning.tasks' has no "
        r"attribute 'nope'"),
    Row("reward-not-callable", lambda t: _reward("lightrft_lightning.tasks:CHARS"), ValueError,
        r"reward 'lightrft_lightning.tasks:CHARS' is not callable \(it is a str\)"),
    Row("reward-path-no-function", lambda t: _reward("lightrft_lightning.tasks:"), ValueError,
        r"reward 'lightrft_lightning.tasks:' is not an import path; accepted: 'package.module:function'"),
    Row("reward-model-directory-empty", lambda t: _reward(str(t)), FileNotFoundError,
        r"reward '.*' is a directory without config.json; accepted: a Hugging Face sequence-classification"),
    Row("reward-raises", lambda t: _reward("tests.test_bad_inputs:raising_reward"), RuntimeError,
        r"reward 'tests.test_bad_inputs:raising_reward' raised KeyError: 'answer'"),
    Row("reward-callable-raises", lambda t: _reward(raising_reward), RuntimeError,
        r"reward 'tests.test_bad_inputs:raising_reward' raised KeyError"),
    Row("reward-default-without-answer", lambda t: _reward("lightrft_lightning.tasks:counting_reward", meta=[{}, {}]),
        RuntimeError, r"reward 'lightrft_lightning.tasks:counting_reward' raised ValueError: counting_reward needs an "
        r"'answer' field in every prompt row; rows \[0, 1\] have none"),
    Row("reward-exact-match-without-answer", lambda t: _reward("lightrft_lightning.algorithms.rewards:exact_match"),
        RuntimeError, r"raised ValueError: exact_match needs an 'answer' field"),
    Row("reward-returns-nan", lambda t: _reward("tests.test_bad_inputs:nan_reward"), ValueError,
        r"reward 'tests.test_bad_inputs:nan_reward' returned non-finite scores \[nan\] for completions \[0\]; "
        r"accepted: finite numbers"),
    Row("reward-returns-inf", lambda t: _reward("tests.test_bad_inputs:inf_reward", "a", "b", "c"), ValueError,
        r"reward 'tests.test_bad_inputs:inf_reward' returned non-finite scores \[-inf\] for completions \[2\]"),
    Row("reward-wrong-count", lambda t: _reward("tests.test_bad_inputs:short_reward"), ValueError,
        r"reward 'tests.test_bad_inputs:short_reward' returned 1 scores for 2 completions; accepted: one number per"),
    Row("reward-returns-scalar", lambda t: _reward("tests.test_bad_inputs:scalar_reward"), TypeError,
        r"reward 'tests.test_bad_inputs:scalar_reward' returned float 1.0; accepted: a sequence of one number per"),
    # ---------------------------------------------------------------- tasks and tokenizer
    Row("counting-prompts-num", lambda t: _counting(num=0), ValueError,
        r"counting_prompts.num=0 is invalid; accepted: an integer >= 1"),
    Row("counting-prompts-answer-len", lambda t: _counting(num=4, answer_len=0), ValueError,
        r"counting_prompts.answer_len=0 is invalid; accepted: an integer >= 1"),
    Row("counting-reward-empty-answer", lambda t: __import__("lightrft_lightning.tasks").tasks.counting_reward(
        ["1"], ["2"], [{"answer": ""}]), ValueError, r"counting_reward: rows \[0\] have an empty 'answer'"),
    Row("tokenizer-type", lambda t: _tokenizer(None), TypeError,
        r"tokenizer=None is invalid; accepted: 'char' or the path of a Hugging Face"),
    Row("tokenizer-empty-directory", lambda t: _tokenizer(str(t)), ValueError,
        r"tokenizer='.*' cannot be loaded .*accepted: a directory with a Hugging Face tokenizer"),
    Row("tokenizer-no-pad-no-eos", _tokenizer_without_pad_or_eos, ValueError,
        r"tokenizer='.*' has neither a pad nor an eos token"),
    # ---------------------------------------------------------------- CLI
    Row("cli-unknown-subcommand", lambda t: _cli("fitt"), ValueError, r"invalid choice: 'fitt'"),
    Row("cli-convert-missing-config", lambda t: _cli("convert", "dcp-to-hf", "a", "b"), ValueError,
        r"the following arguments are required: --config"),
    Row("cli-convert-unknown", lambda t: _cli("convert", "torch-to-hf"), ValueError, r"invalid choice: 'torch-to-hf'"),
    Row("cli-convert-hf-dir-missing", lambda t: _cli("convert", "hf-to-dcp", str(t / "hf"), str(t / "out")), ValueError,
        r"exit 1: .*'.*hf' is not a directory; accepted: a Hugging Face model directory"),
    Row("cli-convert-output-is-file", lambda t: _cli("convert", "hf-to-dcp", str(t), _file(t)), ValueError,
        r"exit 1: .*output '.*file.txt' is a file; accepted: a new or existing directory"),
    Row("cli-convert-tag", lambda t: _cli("convert", "hf-to-dcp", str(t), str(t / "out"), "--tag", "a/b"), ValueError,
        r"exit 1: .*--tag 'a/b' is invalid; accepted: a non-empty folder name without '/'"),
    Row("cli-convert-dcp-output-is-file",
        lambda t: _cli("convert", "dcp-to-hf", str(t), _file(t), "--config", _hf_config_dir(t)), ValueError,
        r"exit 1: .*output '.*file.txt' is a file"),
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

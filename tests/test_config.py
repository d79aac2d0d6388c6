"""StrategyConfig: construction from legacy args, extra args, derived values and validation."""

import argparse

import pytest

from lightrft_lightning import StrategyConfig

# (bad fields, the field name the error must mention, a word from the accepted values)
BAD_CONFIGS = [
    ({"zero_stage": 4}, "zero_stage", "0, 1, 2 or 3"),
    ({"zero_stage": -1}, "zero_stage", "0, 1, 2 or 3"),
    ({"bf16": True, "fp16": True}, "fp16", "at most one"),
    ({"micro_train_batch_size": 0}, "micro_train_batch_size", ">= 1"),
    ({"train_batch_size": 0}, "train_batch_size", ">= 1"),
    ({"train_batch_size": 10, "micro_train_batch_size": 4}, "train_batch_size", "multiple"),
    ({"rollout_batch_size": 0}, "rollout_batch_size", ">= 1"),
    ({"micro_rollout_batch_size": 0}, "micro_rollout_batch_size", ">= 1"),
    ({"actor_learning_rate": -1e-5}, "actor_learning_rate", ">= 0"),
    ({"critic_learning_rate": -1.0}, "critic_learning_rate", ">= 0"),
    ({"max_norm": -1.0}, "max_norm", ">= 0"),
    ({"l2": -0.1}, "l2", ">= 0"),
    ({"engine_type": "tensorrt"}, "engine_type", "vllm, sglang, hf"),
    ({"engine_tp_size": 0}, "engine_tp_size", ">= 1"),
    ({"engine_mem_util": 1.5}, "engine_mem_util", "(0, 1]"),
    ({"engine_sleep_level": 3}, "engine_sleep_level", "1 ("),
    ({"grad_accum_dtype": "fp8"}, "grad_accum_dtype", "'bf16'"),
    ({"adam_betas": (0.9, 1.5)}, "adam_betas", "[0, 1)"),
    ({"zpg": 0}, "zpg", ">= 1"),
    ({"fsdp_cpu_offload": True, "fsdp": False}, "fsdp_cpu_offload", "fsdp=True"),
    ({"shard_size": 0, "fsdp": True}, "shard_size", ">= 1"),
    ({"advantage_estimator": "ppo2"}, "advantage_estimator", "group_norm"),
    ({"kl_estimator": "k4"}, "kl_estimator", "k1, k2, k3"),
    ({"n_samples_per_prompt": 0}, "n_samples_per_prompt", ">= 1"),
    ({"lr_warmup_ratio": 2.0}, "lr_warmup_ratio", "[0, 1]"),
    ({"dist_timeout_minutes": 0}, "dist_timeout_minutes", "> 0"),
    ({"advantage_clip": -0.5}, "advantage_clip", ">= 0"),
    ({"reward_clip": -1.0}, "reward_clip", ">= 0"),
    ({"overlong_buffer_len": 0}, "overlong_buffer_len", ">= 1"),
    ({"overlong_buffer_penalty_factor": -2.0}, "overlong_buffer_penalty_factor", ">= 0"),
    ({"reward_running_norm_minus_mean": True}, "reward_running_norm_minus_mean", "reward_running_norm=True"),
    ({"advantage_estimator": "ppo"}, "advantage_estimator", "reinforce_baseline"),
    # wrong types
    ({"zero_stage": "2"}, "zero_stage", "int"),
    ({"advantages_norm": "yes"}, "advantages_norm", "bool"),
    ({"dynamic_sampling": 1}, "dynamic_sampling", "bool"),
    ({"bf16": "yes"}, "bf16", "bool"),
    ({"seed": 1.5}, "seed", "int"),
    ({"actor_learning_rate": "1e-5"}, "actor_learning_rate", "float"),
    ({"engine_type": 3}, "engine_type", "str"),
    ({"train_batch_size": True}, "train_batch_size", "int"),
]


@pytest.mark.parametrize("fields,field_name,accepted", BAD_CONFIGS, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD_CONFIGS)])
def test_bad_config_names_field_and_accepted_values(fields, field_name, accepted):
    with pytest.raises((ValueError, TypeError)) as err:
        StrategyConfig(**fields)
    message = str(err.value)
    assert field_name in message and accepted in message, message


def test_bad_config_table_is_large_enough():
    assert len({fields_name for _, fields_name, _ in BAD_CONFIGS}) >= 15


def test_from_namespace_keeps_unknown_args_and_original():
    args = argparse.Namespace(seed=7, zero_stage=3, bf16=False, my_flag="x", train_batch_size=8, micro_train_batch_size=2)
    config = StrategyConfig.from_args(args)
    assert (config.seed, config.zero_stage, config.bf16) == (7, 3, False)
    assert config.get_extra_arg("my_flag") == "x"
    assert config.get_extra_arg("missing", 5) == 5
    assert config.args is args
    assert "my_flag" not in config.__dataclass_fields__


def test_from_dict_and_object():
    class Legacy:
        def __init__(self):
            self.max_norm = 0.5
            self.adam_betas = [0.8, 0.9]
            self.custom = 1

    assert StrategyConfig.from_args({"fsdp": True, "custom": 2}).get_extra_arg("custom") == 2
    config = StrategyConfig.from_args(Legacy())
    assert config.max_norm == 0.5 and config.adam_betas == (0.8, 0.9) and config.get_extra_arg("custom") == 1
    assert StrategyConfig.from_args(config) is config
    with pytest.raises(TypeError, match="argparse.Namespace"):
        StrategyConfig.from_args(3)


def test_bad_value_from_args_is_reported():
    with pytest.raises(ValueError, match="zero_stage"):
        StrategyConfig.from_args(argparse.Namespace(zero_stage=5))


@pytest.mark.parametrize("value", ["no", "banana", "yes", 1])
@pytest.mark.parametrize("wrap", [argparse.Namespace, dict], ids=["namespace", "dict"])
def test_a_flag_from_args_must_be_a_bool(wrap, value):
    # a string is never read as a flag: "no" would otherwise be truthy
    with pytest.raises(TypeError, match=r"StrategyConfig.bf16 must be bool, got"):
        StrategyConfig.from_args(wrap(bf16=value))


def test_accumulation_steps_uses_world_size():
    config = StrategyConfig(train_batch_size=32, micro_train_batch_size=4)
    assert config.accumulation_steps(1) == 8
    assert config.accumulation_steps(2) == 4
    with pytest.raises(ValueError, match="micro_train_batch_size \\* world_size"):
        config.accumulation_steps(3)


def test_defaults_match_lightrft():
    config = StrategyConfig()
    assert (config.seed, config.max_norm, config.micro_train_batch_size, config.train_batch_size) == (42, 1.0, 1, 128)
    # engine_type: LightRFT says "vllm"; "hf" is the engine that needs no extra package
    assert (config.bf16, config.zero_stage, config.fsdp, config.engine_type) == (True, 2, False, "hf")

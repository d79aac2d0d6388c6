"""A pretrained actor is built on the meta device and takes the checkpoint's weights at the strategy's set-up:
FSDP2 shards it first and each rank reads only its rows (ZeRO-3: its flat ranges), so no rank holds it whole; the trained numbers are
those of the actor loaded whole on every rank before the Trainer (tests/scripts/pretrained_setup.py)."""

from __future__ import annotations

import pytest
import torch

from lightrft_lightning.algorithms import GRPO
from lightrft_lightning.parallel.meta_init import materialize_meta
from lightrft_lightning.tiny_models import tiny_causal_lm
from tests.launch import script_result, torchrun

CHARS = "0123456789+="  # tests/scripts/pretrained_setup.py's tokenizer: 12 characters and 3 special tokens
TIMING = ("time/", "perf/", "rollout/")


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("pretrained")
    tiny_causal_lm(vocab_size=len(CHARS) + 3, tie_word_embeddings=True).save_pretrained(str(path))
    return str(path)


def test_a_pretrained_actor_is_built_on_the_meta_device_and_materializes_to_its_checkpoint(pretrained_dir):
    module = GRPO(model=pretrained_dir, tokenizer="char", tokenizer_chars=CHARS, kl_coef=0.1)
    actor, ref = module.actor, module.ref
    assert all(p.is_meta for p in actor.parameters()) and all(p.is_meta for p in ref.parameters())
    assert not any(b.is_meta for b in actor.buffers())  # rotary tables are real
    assert actor.lm_head.weight is actor.model.embed_tokens.weight
    assert actor.generation_config.pad_token_id == module.tokenizer.pad_token_id
    materialize_meta(module, torch.device("cpu"), seed=0)
    loaded = type(actor).from_pretrained(pretrained_dir, dtype=torch.float32)
    for (name, param), expected in zip(actor.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(param, expected), name
    # the frozen reference shares the actor's tensors until the strategy has set them up, as before
    assert ref.model.embed_tokens.weight.data_ptr() == actor.model.embed_tokens.weight.data_ptr()
    assert not any(p.requires_grad for p in ref.parameters()) and actor.lm_head.weight is actor.model.embed_tokens.weight


def _run(pretrained_dir: str, strategy: str, algo: str, mode: str, precision: str) -> dict:
    return script_result(torchrun("pretrained_setup.py", 2, pretrained_dir, strategy, algo, mode, precision, timeout=300))


@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy, algo, precision", [
    ("lightrft_fsdp", "grpo", "32-true"), ("lightrft_deepspeed_stage_3", "ppo", "32-true"),
    # the engines train in bf16: the critic's head and DeepSpeed's own F.linear as when it partitions a model itself
    ("lightrft_deepspeed_stage_3", "ppo", "bf16-mixed")])
def test_no_rank_holds_the_pretrained_actor_at_set_up_and_the_numbers_are_the_loaded_ones(pretrained_dir, strategy, algo,
                                                                                           precision):
    meta = _run(pretrained_dir, strategy, algo, "meta", precision)
    loaded = _run(pretrained_dir, strategy, algo, "loaded", precision)
    models = ("actor", "ref") if algo == "grpo" else ("actor", "critic")
    assert meta["meta_before_setup"] == dict.fromkeys(models, True)  # nothing real until the strategy's set-up
    assert meta["whole_model_loads"] == 0  # and then no rank loads the whole checkpoint
    assert loaded["meta_before_setup"] == dict.fromkeys(models, False)
    for name in models:
        assert meta["held"][name] == pytest.approx(0.5, abs=0.01), name  # then half of each per rank
    if precision == "32-true":  # each rank read its rows (FSDP2) or its flat range (ZeRO-3): the checkpoint's weights
        assert meta["weights_are_the_checkpoints"] == dict.fromkeys(models, True)
    assert len(meta["steps"]) == 2 and any(step["loss/policy"] != 0 for step in meta["steps"])
    for got, expected in zip(meta["steps"], loaded["steps"]):
        numbers = {k: v for k, v in expected.items() if not k.startswith(TIMING)}
        assert {k: got[k] for k in numbers} == numbers


@pytest.mark.parametrize("shard_size", [None, "20KB"])
def test_zero3_partitions_read_exactly_their_flat_range_of_each_checkpoint_tensor(tmp_path, shard_size):
    from safetensors.torch import load_file

    from lightrft_lightning.parallel.deepspeed import SafetensorsRanges

    model = tiny_causal_lm(vocab_size=len(CHARS) + 3, tie_word_embeddings=False)
    model.save_pretrained(str(tmp_path), **({"max_shard_size": shard_size} if shard_size else {}))
    files = sorted(tmp_path.glob("*.safetensors"))
    assert (len(files) > 1) == (shard_size is not None)  # one file, or shards behind an index
    full = {k: v for f in files for k, v in load_file(str(f)).items()}
    with SafetensorsRanges(str(tmp_path)) as reader:
        for name, tensor in full.items():
            flat = tensor.reshape(-1)
            for start, count in [(0, flat.numel()), (0, 1), (flat.numel() // 3, flat.numel() // 2), (flat.numel() - 5, 5),
                                 (flat.numel(), 0)]:
                assert torch.equal(reader.flat_range(name, tuple(tensor.shape), start, count), flat[start:start + count]), name
        with pytest.raises(ValueError, match="has no weight 'nope'"):
            reader.flat_range("nope", (1,), 0, 1)
        name, tensor = next(iter(full.items()))
        with pytest.raises(ValueError, match="of shape"):
            reader.flat_range(name, (tensor.numel() + 1,), 0, 1)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        SafetensorsRanges(str(tmp_path / "missing"))


def test_zero3_reads_partitions_unless_deepspeed_keeps_a_second_copy_of_each():
    from lightrft_lightning.parallel.deepspeed import reads_pretrained_partitions

    zero3 = {"zero_optimization": {"stage": 3}}
    assert reads_pretrained_partitions(zero3)
    assert reads_pretrained_partitions({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}})
    assert not reads_pretrained_partitions({"zero_optimization": {"stage": 2}})  # whole weights per rank anyway
    assert not reads_pretrained_partitions({})
    for extra in ({"zero_hpz_partition_size": 2}, {"zero_quantized_weights": True},
                  {"zero_quantized_nontrainable_weights": True}, {"offload_param": {"device": "nvme"}}):
        assert not reads_pretrained_partitions({"zero_optimization": {"stage": 3, **extra}}), extra

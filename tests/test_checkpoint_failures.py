"""Damaged and hostile checkpoints on real files: truncated or corrupted shards, a missing
``.metadata``, another model's checkpoint, and pickle payloads, each refused with an error naming
the file or the keys; never a silent partial load and never code execution."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import pytest
import torch

from lightrft_lightning import LightRFTFake, checkpoint
from lightrft_lightning.checkpoint import CheckpointError
from lightrft_lightning.checkpoint.dcp import quiet_single_process, write_crc
from lightrft_lightning.tiny_models import tiny_causal_lm

PWNED = Path("/tmp/lightrft_lightning_pwned")


def saved(tmp_path: Path, seed: int = 0, **model_kwargs) -> tuple[LightRFTFake, torch.nn.Module, Path]:
    strategy = LightRFTFake({"bf16": False})
    model = tiny_causal_lm(seed=seed, **model_kwargs)
    model, _, _ = strategy.prepare((model, strategy.create_optimizer(model), None))
    path = Path(strategy.save_ckpt(model, str(tmp_path), tag="ck"))
    return strategy, model, path


def fresh(seed: int = 1, **model_kwargs) -> tuple[LightRFTFake, torch.nn.Module]:
    strategy = LightRFTFake({"bf16": False})
    model = tiny_causal_lm(seed=seed, **model_kwargs)
    model, _, _ = strategy.prepare((model, strategy.create_optimizer(model), None))
    return strategy, model


def shard(path: Path) -> Path:
    return max(path.glob("*.distcp"), key=lambda f: f.stat().st_size)


def test_round_trip_is_exact(tmp_path):
    _, model, path = saved(tmp_path)
    strategy, other = fresh()
    strategy.load_ckpt(other, str(tmp_path))
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name


def test_truncated_shard_names_the_file(tmp_path):
    _, _, path = saved(tmp_path)
    file = shard(path)
    with open(file, "r+b") as f:
        f.truncate(file.stat().st_size // 2)
    strategy, model = fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=f"{file}.*truncated"):
        strategy.load_ckpt(model, str(tmp_path))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched


def test_corrupted_shard_names_the_file(tmp_path):
    _, _, path = saved(tmp_path)
    file = shard(path)
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside a tensor
    file.write_bytes(bytes(data))
    strategy, model = fresh()
    with pytest.raises(CheckpointError, match=f"{file}.*corrupted"):
        strategy.load_ckpt(model, str(tmp_path))


def test_missing_metadata_names_the_file(tmp_path):
    _, _, path = saved(tmp_path)
    (path / ".metadata").unlink()
    strategy, model = fresh()
    with pytest.raises(FileNotFoundError, match=r"ck/\.metadata is missing"):
        strategy.load_ckpt(model, str(tmp_path))
    with pytest.raises(CheckpointError, match=r"\.metadata is missing"):
        checkpoint.load_full(str(path))


def test_missing_shard_names_the_file(tmp_path):
    _, _, path = saved(tmp_path)
    file = shard(path)
    file.unlink()
    strategy, model = fresh()
    with pytest.raises(CheckpointError, match=f"{file} is missing"):
        strategy.load_ckpt(model, str(tmp_path))


def test_checkpoint_of_another_model_names_the_keys(tmp_path):
    saved(tmp_path, num_hidden_layers=1)
    strategy, model = fresh(num_hidden_layers=2)
    with pytest.raises(CheckpointError, match=r"keys missing from the checkpoint.*model\.model\.layers\.1\."):
        strategy.load_ckpt(model, str(tmp_path))


def test_checkpoint_with_other_shapes_names_the_keys(tmp_path):
    saved(tmp_path, hidden_size=32)
    strategy, model = fresh(hidden_size=48, num_attention_heads=4)
    with pytest.raises(CheckpointError, match=r"other shapes.*embed_tokens"):
        strategy.load_ckpt(model, str(tmp_path))


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {PWNED}",))


def test_pickle_payload_in_metadata_is_refused(tmp_path):
    _, _, path = saved(tmp_path)
    PWNED.unlink(missing_ok=True)
    (path / ".metadata").write_bytes(pickle.dumps(_Payload()))
    strategy, model = fresh()
    with pytest.raises(CheckpointError, match=r"\.metadata.*refused.*posix\.system|\.metadata.*refused.*os\.system"):
        strategy.load_ckpt(model, str(tmp_path))
    assert not PWNED.exists()


def test_pickle_payload_in_an_entry_is_refused(tmp_path):
    # forge a checkpoint whose non-tensor DCP entry is a hostile pickle, with valid metadata and CRCs
    import torch.distributed.checkpoint as dcp

    forged = tmp_path / "forged"
    with quiet_single_process():
        dcp.save({"model": {"evil": _Payload()}}, checkpoint_id=str(forged), no_dist=True)
    PWNED.unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match=r"'model\.evil'.*weights_only=True refuses"):
        checkpoint.load_full(str(forged))
    with pytest.raises(CheckpointError, match=r"'model\.evil'.*weights_only=True refuses"):
        checkpoint.load(str(forged), {"model": {"evil": 0}})
    assert not PWNED.exists()


def test_pickle_payload_in_extra_state_is_refused(tmp_path):
    _, _, path = saved(tmp_path)
    buffer = io.BytesIO()
    torch.save({"scheduler": _Payload()}, buffer)
    (path / checkpoint.EXTRA_STATE).write_bytes(buffer.getvalue())
    write_crc(path, 0, names=[checkpoint.EXTRA_STATE])
    PWNED.unlink(missing_ok=True)
    strategy, model = fresh()
    with pytest.raises(CheckpointError, match=r"extra_state\.pt cannot be loaded with weights_only=True"):
        strategy.load_ckpt(model, str(tmp_path))
    assert not PWNED.exists()


def test_latest_never_names_a_partial_checkpoint(tmp_path):
    strategy, model, _ = saved(tmp_path)
    # a save that dies after writing its shards: the temporary directory stays, latest does not move
    import torch.distributed.checkpoint as dcp

    real_save = dcp.save

    def dies(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt("killed mid-save")

    dcp.save = dies
    try:
        with pytest.raises(KeyboardInterrupt):
            strategy.save_ckpt(model, str(tmp_path), tag="ck2")
    finally:
        dcp.save = real_save
    assert checkpoint.read_latest(tmp_path) == "ck" and not (tmp_path / "ck2").exists()
    assert (tmp_path / ".tmp-ck2").is_dir()
    other_strategy, other = fresh()
    path, _ = other_strategy.load_ckpt(other, str(tmp_path))
    assert path.endswith("/ck")


def test_engine_that_fails_to_wake_leaves_training_state_untouched(tmp_path):
    """A rollout engine whose wake-up fails (e.g. out of device memory) stops the step with the
    engine's error before any gradient, and the weights, optimizer and step counters are as before."""
    import lightning.pytorch as pl

    from lightrft_lightning.callbacks import DCPCheckpoint, RolloutEngineCallback, find_rollout_callback
    from lightrft_lightning.engines import HFEngine, SamplingParams
    from tests.scripts.ckpt_common import NoisyLM, params, prompts

    class NoWake(HFEngine):
        def _wake(self, tags):
            raise RuntimeError("CUDA out of memory while waking the KV cache")

    class Rollouts(NoisyLM):
        fail_at = 2

        def training_step(self, batch, batch_idx):
            if self.global_step == self.fail_at:
                self.before = (params(self.actor), self.trainer.strategy.stepper(self.actor).steps,
                               [v.clone() for s in self.optimizers().optimizer.state.values() for v in s.values()])
                find_rollout_callback(self.trainer).generate(self, [[1, 2, 3]], SamplingParams(max_new_tokens=2))
            return super().training_step(batch, batch_idx)

    module = Rollouts()
    engine = NoWake(tiny_causal_lm(), pad_token_id=0)
    engine.sleep()
    trainer = pl.Trainer(accelerator="cpu", strategy=LightRFTFake({"bf16": False, "train_batch_size": 2}), max_steps=4,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[RolloutEngineCallback(engine=engine), DCPCheckpoint(tmp_path, every_n_train_steps=1)])
    with pytest.raises(RuntimeError, match="CUDA out of memory while waking"):
        trainer.fit(module, prompts())
    weights, steps, optim = module.before
    assert all(torch.equal(weights[k], v) for k, v in params(module.actor).items())
    assert trainer.strategy.stepper(module.actor).steps == steps == 2
    after = [v for s in module.optimizers().optimizer.state.values() for v in s.values()]
    assert len(optim) == len(after) > 0 and all(torch.equal(a, b) for a, b in zip(optim, after))
    assert checkpoint.read_latest(tmp_path) == "global_step2"  # the last good checkpoint stays the latest


def test_publish_fsyncs_the_directory_after_the_rename_and_after_latest(tmp_path, monkeypatch):
    """Durability: the rename and ``latest`` are fsynced on the directory; DCP's shards are fsynced
    once (by DCP's ``FileSystemWriter(sync_files=True)``), not again by the writer."""
    strategy, model = fresh()
    real_fsync = os.fsync
    synced: list[tuple[Path, bool, bool, object]] = []

    def fsync(fd):
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        synced.append((path, path.is_dir(), (tmp_path / "ck").is_dir(), checkpoint.read_latest(tmp_path)))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = Path(strategy.save_ckpt(model, str(tmp_path), tag="ck"))
    root_syncs = [(published, latest) for p, is_dir, published, latest in synced if is_dir and p == tmp_path]
    assert (True, None) in root_syncs  # after the rename, before latest
    assert root_syncs[-1] == (True, "ck")  # after latest
    shards = [p for p, *_ in synced if p.suffix == ".distcp"]
    assert shards and len(shards) == len(set(shards)) == len(list(path.glob("*.distcp")))
    assert any(p.name == checkpoint.EXTRA_STATE for p, *_ in synced)  # the writer's own files are synced


@pytest.mark.parametrize("cuda", [False, True], ids=["cpu", "cuda"])
def test_async_save_stages_through_pinned_memory_on_cuda(cuda, monkeypatch):
    # issue 29 risk 9: DCP's default stager copies into pageable memory (CUDA cannot run here)
    from lightrft_lightning.checkpoint import publish

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    options = publish.staging_options()
    assert (options.use_pinned_memory, options.use_non_blocking_copy) == (cuda, cuda)
    assert not options.use_async_staging  # staged before the save returns: training may change weights after


def test_async_save_uses_the_stager_and_reloads(tmp_path, monkeypatch):
    from torch.distributed.checkpoint.staging import DefaultStager

    from lightrft_lightning.checkpoint import publish

    staged = []
    real_async_save = publish.dcp.async_save

    def record(*args, async_stager=None, **kwargs):
        staged.append(async_stager)
        return real_async_save(*args, async_stager=async_stager, **kwargs)

    monkeypatch.setattr(publish.dcp, "async_save", record)
    model = tiny_causal_lm(seed=0)
    for tag in ("a", "b"):
        checkpoint.save(str(tmp_path), tag, {"model": model.state_dict()}, {}, async_save=True, no_dist=True).wait()
    assert isinstance(staged[0], DefaultStager) and staged[1] is staged[0]  # one stager, buffers reused
    reloaded = {"model": tiny_causal_lm(seed=1).state_dict()}
    checkpoint.load(str(tmp_path / "b"), reloaded)
    assert all(torch.equal(reloaded["model"][k], v) for k, v in model.state_dict().items())

"""DCP checkpoint directories: atomic save, ``latest`` pointer, rotation, integrity checks and a
pickle-safe load.

Layout of ``save_dir``::

    latest                  text file holding the tag of the newest complete checkpoint
    <tag>/.metadata         torch.distributed.checkpoint metadata
    <tag>/__*_*.distcp      DCP shards (model and optimizer state, sharded or not)
    <tag>/extra_state.pt    scheduler, step counters and client state (tensors and plain types)
    <tag>/.crc32-<rank>     CRC-32 of the files rank <rank> wrote, checked before loading

Nothing here unpickles arbitrary objects: ``.metadata`` goes through an unpickler that only builds
DCP's own metadata classes, and every other pickle loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

LATEST = "latest"
EXTRA_STATE = "extra_state.pt"
METADATA = ".metadata"
CRC_PREFIX = ".crc32-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded: incomplete, corrupted, unsafe or of another model."""


# ---------------------------------------------------------------------- pickle-safe reading
_METADATA_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP ``Metadata`` and nothing else (DCP itself reads ``.metadata`` with ``pickle.load``)."""

    def find_class(self, module: str, name: str) -> Any:
        obj = getattr(torch, name, None) if module == "torch" else None
        allowed = (
            (module, name) in _METADATA_GLOBALS
            or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format))
            or (module == dcp_metadata.__name__ and isinstance(getattr(dcp_metadata, name, None), type))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in checkpoint metadata")
        return super().find_class(module, name)


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` is unpickled with an allow-list of DCP classes."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path.parent} is incomplete: {path} is missing")
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except Exception as err:
            raise CheckpointError(f"{path} is not a valid DCP metadata file and was refused: {err}") from err
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not DCP metadata; refused")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeBytes:
    """DCP's default planners unpickle non-tensor entries with ``weights_only=False``; this refuses
    anything but tensors and plain Python types."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as err:
            raise CheckpointError(
                f"checkpoint entry {read_item.dest_index.fqn!r} holds a pickle that weights_only=True refuses: {err}"
            ) from err
        if self.flatten_state_dict:  # type: ignore[attr-defined]
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)  # type: ignore[attr-defined]
        else:
            self.state_dict[read_item.dest_index.fqn] = obj  # type: ignore[attr-defined]


class SafeLoadPlanner(_SafeBytes, DefaultLoadPlanner):
    """Loads into a template state dict (resharding as needed), refusing arbitrary pickles."""


class _SafeFullLoadPlanner(_SafeBytes, _EmptyStateDictLoadPlanner):
    """Rebuilds the whole saved state dict from the metadata (one process), refusing arbitrary pickles."""


# ---------------------------------------------------------------------- saving
@dataclass
class _Pending:
    """Asynchronous saves started inside :func:`async_saves` and not finished yet."""

    futures: list[Any] = field(default_factory=list)
    finishers: list[Callable[[], None]] = field(default_factory=list)

    def wait(self) -> None:
        """Wait for the files, then rename them into place and move ``latest`` (in save order)."""
        futures, finishers = self.futures, self.finishers
        self.futures, self.finishers = [], []
        for future in futures:
            future.result()
        for finish in finishers:
            finish()

    def __bool__(self) -> bool:
        return bool(self.futures or self.finishers)


_ASYNC: Optional[_Pending] = None
_ASYNC_GROUP: Any = None
_BACKGROUND: Optional[ThreadPoolExecutor] = None


def _background() -> ThreadPoolExecutor:
    global _BACKGROUND
    if _BACKGROUND is None:
        _BACKGROUND = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightrft-ckpt")
    return _BACKGROUND


@contextmanager
def async_saves(pending: _Pending) -> Iterator[_Pending]:
    """Inside this block :func:`save` writes with ``torch.distributed.checkpoint.async_save`` and
    returns once the state is staged in memory; ``pending.wait()`` finishes the saves (every rank
    must call it). Strategies that save through :func:`save` become asynchronous unchanged."""
    global _ASYNC
    previous, _ASYNC = _ASYNC, pending
    try:
        yield pending
    finally:
        _ASYNC = previous


def save(
    save_dir: str,
    tag: str,
    dcp_state: dict[str, Any],
    extra: dict[str, Any],
    *,
    max_num: int = 3,
    max_mem: float = 1000,
    save_latest: bool = True,
    is_rank_0: bool = True,
    barrier: Callable[[], None] = lambda: None,
    no_dist: bool = False,
) -> str:
    """Write ``dcp_state`` (every rank) and ``extra`` (rank 0) into ``save_dir/tag``. Files go to a
    hidden temporary directory that is renamed once complete; ``latest`` moves after that.
    ``no_dist`` writes from this process alone even when a process group exists."""
    root = Path(save_dir)
    final, tmp = root / tag, root / f".tmp-{tag}"
    if is_rank_0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    rank = 0 if no_dist or not dist.is_initialized() else dist.get_rank()

    def write_rest() -> None:
        _write_crc(tmp, rank)
        if is_rank_0:
            torch.save(extra, tmp / EXTRA_STATE)
            _write_crc(tmp, rank, names=[EXTRA_STATE])
            _fsync_dir(tmp)

    def publish() -> None:
        barrier()
        if is_rank_0:
            _replace_dir(tmp, final)
            if save_latest:
                write_latest(root, tag)
            rotate(root, max_num=max_num, max_mem=max_mem, keep={tag})
        barrier()

    with _single_process_quiet():
        if _ASYNC is None:
            dcp.save(dcp_state, checkpoint_id=str(tmp), no_dist=no_dist)
            write_rest()
            publish()
        else:
            written = dcp.async_save(dcp_state, checkpoint_id=str(tmp), no_dist=no_dist,
                                     process_group=None if no_dist else _async_group())
            # checksums and fsync in the background too; only the renames (collective) wait for wait()
            _ASYNC.futures.append(_background().submit(lambda: (written.result(), write_rest())))
            _ASYNC.finishers.append(publish)
    return str(final)


def _async_group() -> Any:
    """A gloo group of its own for async saves, so their background collectives never interleave
    with training collectives on the default group."""
    global _ASYNC_GROUP
    if _ASYNC_GROUP is None and dist.is_initialized():
        _ASYNC_GROUP = dist.new_group(backend="gloo")
    return _ASYNC_GROUP


def _replace_dir(src: Path, dst: Path) -> None:
    if dst.exists():
        old = dst.parent / f".old-{dst.name}"
        shutil.rmtree(old, ignore_errors=True)
        dst.rename(old)
        src.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        src.rename(dst)


def write_latest(root: Path, tag: str) -> None:
    """Point ``root/latest`` at ``tag`` with an atomic replace."""
    tmp = Path(root) / f".{LATEST}.tmp"
    tmp.write_text(tag)
    os.replace(tmp, Path(root) / LATEST)


def read_latest(root: Path) -> Optional[str]:
    """The tag ``root/latest`` names, or None."""
    pointer = Path(root) / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def rotate(root: Path, max_num: int, max_mem: float, keep: set[str],
           is_checkpoint: Optional[Callable[[Path], bool]] = None) -> list[str]:
    """Delete the oldest complete checkpoints until at most ``max_num`` remain and they use at most
    ``max_mem`` GB; tags in ``keep`` and the one ``latest`` names are never deleted.
    ``is_checkpoint`` tells a checkpoint directory (default: a DCP one, with ``.metadata``)."""
    root = Path(root)
    is_checkpoint = is_checkpoint or (lambda p: (p / METADATA).exists())
    latest = read_latest(root)
    protected = set(keep) | ({latest} if latest else set())
    tags = sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and is_checkpoint(p)),
        key=lambda p: p.stat().st_mtime,
    )
    sizes = {p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in tags}
    removed = []
    for path in list(tags):
        too_many = len(tags) > max_num
        too_big = sum(sizes[p] for p in tags) > max_mem * 1024**3
        if not (too_many or too_big):
            break
        if path.name in protected:
            continue
        shutil.rmtree(path)
        tags.remove(path)
        removed.append(path.name)
    return removed


# ---------------------------------------------------------------------- loading
def resolve(load_dir: str, tag: Optional[str] = None) -> str:
    """The checkpoint directory for ``tag`` (default: the one ``latest`` names), checked to be complete."""
    root = Path(load_dir)
    if tag is None:
        tag = read_latest(root)
        if tag is None:
            raise FileNotFoundError(f"no checkpoint to load: {root / LATEST} does not exist (pass tag= or save one first)")
    path = root / tag
    for required in (METADATA, EXTRA_STATE):
        if not (path / required).is_file():
            raise FileNotFoundError(f"checkpoint {path} is incomplete: {path / required} is missing")
    return str(path)


def verify(path: str) -> None:
    """Check that every file the metadata of checkpoint ``path`` refers to exists, is long enough
    and matches the CRC-32 recorded at save time; raise :class:`CheckpointError` naming the file.
    With a process group, each rank checks a share of the files and every rank raises."""
    root = Path(path)
    error = None
    try:
        metadata = SafeFileSystemReader(str(root)).read_metadata()
        needed: dict[str, int] = {}
        for info in (metadata.storage_data or {}).values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
        crcs: dict[str, int] = {}
        for crc_file in root.glob(CRC_PREFIX + "*"):
            crcs.update(json.loads(crc_file.read_text()))
        names = sorted(set(needed) | set(crcs))
        world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
        for name in names[rank::world]:
            file = root / name
            if not file.is_file():
                raise CheckpointError(f"checkpoint {root} is incomplete: {file} is missing")
            size = file.stat().st_size
            if size < needed.get(name, 0):
                raise CheckpointError(f"checkpoint file {file} is truncated: {size} bytes, the metadata needs {needed[name]}")
            if name in crcs and _crc32(file) != crcs[name]:
                raise CheckpointError(f"checkpoint file {file} is corrupted: its CRC-32 differs from the one saved with it")
    except CheckpointError as err:
        error = str(err)
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors: list[Optional[str]] = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        raise CheckpointError(error)


def load(path: str, dcp_state: dict[str, Any]) -> dict[str, Any]:
    """Load DCP shards into ``dcp_state`` in place (pickle-safe, verified first) and return the extra state."""
    verify(path)
    try:
        with _single_process_quiet():
            dcp.load(dcp_state, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner())
    except (Exception, CheckpointException) as err:  # DCP wraps per-rank failures (a BaseException)
        raise CheckpointError(f"loading checkpoint {path} failed: {_explain(err, path, dcp_state)}") from err
    return load_extra(path)


def load_extra(path: str) -> dict[str, Any]:
    """The rank-0 extra state of checkpoint ``path`` (``weights_only=True``)."""
    file = Path(path) / EXTRA_STATE
    try:
        return torch.load(file, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete: {file} is missing") from None
    except Exception as err:
        raise CheckpointError(f"{file} cannot be loaded with weights_only=True (corrupted or unsafe): {err}") from err


def load_full(path: str, keys: Optional[set[str]] = None) -> dict[str, Any]:
    """Every entry of DCP checkpoint ``path`` (or those under ``keys``) as plain tensors and values,
    read in this process without a model or a process group (pickle-safe, verified first)."""
    verify(path)
    state: dict[str, Any] = {}
    try:
        with _single_process_quiet():
            _load_state_dict(state, storage_reader=SafeFileSystemReader(path),
                             planner=_SafeFullLoadPlanner(keys=keys), no_dist=True)
    except (Exception, CheckpointException) as err:
        raise CheckpointError(f"loading checkpoint {path} failed: {err}") from err
    return state


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The ``LightningModule`` state dict of a Lightning checkpoint written under any strategy of this
    package (a ``torch.save`` file, or a DCP directory from ``LightRFTFSDP`` / ``LightRFTDeepSpeed`` /
    :class:`DCPCheckpointIO`), read in this process with ``weights_only=True``. Keys are the module's
    own (``actor.0.weight``), whatever the backend."""
    file = Path(path)
    if file.is_file():
        return torch.load(file, map_location="cpu", weights_only=True)["state_dict"]
    if not (file / METADATA).is_file():
        raise FileNotFoundError(f"{path} is not a Lightning checkpoint: neither a file nor a DCP directory with {METADATA}")
    return load_full(str(file), keys={"state_dict"})["state_dict"]


def _explain(err: Exception, path: str, dcp_state: dict[str, Any]) -> str:
    """DCP's message for a missing key is terse; list what the model expects and the checkpoint lacks."""
    try:
        metadata = SafeFileSystemReader(path).read_metadata()
        from torch.distributed.checkpoint._nested_dict import flatten_state_dict

        flat, _ = flatten_state_dict(dcp_state)
        missing = sorted(set(flat) - set(metadata.state_dict_metadata))
        mismatched = sorted(
            k for k in set(flat) & set(metadata.state_dict_metadata)
            if isinstance(flat[k], torch.Tensor) and hasattr(metadata.state_dict_metadata[k], "size")
            and tuple(metadata.state_dict_metadata[k].size) != tuple(flat[k].shape)
        )
    except Exception:  # the original error is the one to report
        return str(err)
    if not isinstance(err, CheckpointException) and not missing and not mismatched:
        return str(err)
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    parts = [next((line for line in lines if "Error:" in line), lines[-1] if lines else type(err).__name__)]
    if missing:
        parts.append(f"keys missing from the checkpoint (another model's checkpoint?): {missing[:8]}"
                     + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    if mismatched:
        parts.append(f"keys with other shapes in the checkpoint: {mismatched[:8]}")
    return "; ".join(parts)


# ---------------------------------------------------------------------- Lightning CheckpointIO
try:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO as _CheckpointIO
except ImportError:  # pragma: no cover - lightning is a dependency
    _CheckpointIO = object  # type: ignore[assignment,misc]


class DCPCheckpointIO(_CheckpointIO):  # type: ignore[misc,valid-type]
    """Lightning ``CheckpointIO`` that writes a checkpoint as a DCP directory (weights and optimizer
    states as DCP shards, the rest in ``extra_state.pt``) from one process, atomically, and reads
    it back without a template. For single-process strategies (``LightRFTFake``):
    ``Trainer(plugins=[DCPCheckpointIO()])``."""

    TENSOR_KEYS = ("state_dict", "optimizer_states")

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("DCPCheckpointIO.save_checkpoint: storage_options is not supported")
        path = Path(path)
        dcp_state = {k: checkpoint[k] for k in self.TENSOR_KEYS if k in checkpoint}
        extra = {k: v for k, v in checkpoint.items() if k not in dcp_state}
        save(str(path.parent), path.name, dcp_state, extra, max_num=2**62, max_mem=float("inf"),
             save_latest=False, no_dist=True)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Optional[bool] = None) -> dict[str, Any]:
        path = str(path)
        if not (Path(path) / METADATA).is_file():
            raise FileNotFoundError(f"{path} is not a DCP checkpoint directory: {Path(path) / METADATA} is missing")
        checkpoint = load_extra(path)
        checkpoint.update(load_full(path))
        for opt in checkpoint.get("optimizer_states", []):
            # DCP stores dict keys as strings; torch optimizers key their state by parameter index
            opt["state"] = {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in opt.get("state", {}).items()}
        return checkpoint

    def remove_checkpoint(self, path: Any) -> None:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------- helpers
def _crc32(file: Path, chunk: int = 16 * 2**20) -> int:
    crc = 0
    with open(file, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def _write_crc(directory: Path, rank: int, names: Optional[list[str]] = None) -> None:
    """Record the CRC-32 of the shards this rank wrote (``__<rank>_*``) or of ``names``."""
    files = [directory / n for n in names] if names else sorted(directory.glob(f"__{rank}_*"))
    if not files:
        return
    target = directory / f"{CRC_PREFIX}{rank}{'-' + '-'.join(names) if names else ''}"
    target.write_text(json.dumps({f.name: _crc32(f) for f in files}))


def _fsync_dir(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())


@contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every call without a process group; one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        warnings.filterwarnings("ignore", message=".*experimental.*")
        yield

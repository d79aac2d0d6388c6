"""Reading DCP checkpoint directories, and their integrity: CRC-32 records, a pickle-safe load, the
template-free loader and the errors that explain a refused checkpoint. The only module that uses
``torch.distributed.checkpoint``'s private names.

Layout of a checkpoint directory (written by :mod:`lightrft_lightning.checkpoint.publish`)::

    <tag>/.metadata         torch.distributed.checkpoint metadata
    <tag>/__*_*.distcp      DCP shards (model and optimizer state, sharded or not)
    <tag>/extra_state.pt    scheduler, step counters and client state (tensors and plain types)
    <tag>/.crc32-<rank>     CRC-32 of the files rank <rank> wrote, checked before loading

and ``latest`` next to the tag directories holds the tag of the newest complete checkpoint.

Nothing here unpickles arbitrary objects: ``.metadata`` goes through an unpickler that only builds
DCP's own metadata classes, and every other pickle loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json
import pickle
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
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
            if name in crcs and crc32(file) != crcs[name]:
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
        with quiet_single_process():
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
        with quiet_single_process():
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


# ---------------------------------------------------------------------- integrity and helpers
def read_latest(root: Path) -> Optional[str]:
    """The tag ``root/latest`` names, or None."""
    pointer = Path(root) / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def crc32(file: Path, chunk: int = 16 * 2**20) -> int:
    """The CRC-32 of ``file``, read in chunks."""
    crc = 0
    with open(file, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def write_crc(directory: Path, rank: int, names: Optional[list[str]] = None) -> list[Path]:
    """Record the CRC-32 of the shards rank ``rank`` wrote (``__<rank>_*``) or of ``names`` in
    ``directory``, for :func:`verify`. Returns the file written (none when there is nothing to record)."""
    files = [directory / n for n in names] if names else sorted(directory.glob(f"__{rank}_*"))
    if not files:
        return []
    target = directory / f"{CRC_PREFIX}{rank}{'-' + '-'.join(names) if names else ''}"
    target.write_text(json.dumps({f.name: crc32(f) for f in files}))
    return [target]


@contextmanager
def quiet_single_process() -> Iterator[None]:
    """DCP warns on every call without a process group; one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        warnings.filterwarnings("ignore", message=".*experimental.*")
        yield

"""DCP checkpoint directories: atomic save, ``latest`` pointer, rotation and a pickle-safe load.

Layout of ``save_dir``::

    latest                  text file holding the tag of the newest complete checkpoint
    <tag>/.metadata         torch.distributed.checkpoint metadata
    <tag>/__*_*.distcp      DCP shards (model and optimizer state, sharded or not)
    <tag>/extra_state.pt    scheduler, step counters and client state (tensors and plain types)
"""

from __future__ import annotations

import io
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.planner import ReadItem


LATEST = "latest"
EXTRA_STATE = "extra_state.pt"
METADATA = ".metadata"


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner unpickles non-tensor entries with ``weights_only=False``; this one
    refuses anything but tensors and plain Python types."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as err:
            raise RuntimeError(
                f"checkpoint entry {read_item.dest_index.fqn!r} holds a pickle that weights_only=True refuses: {err}"
            ) from err
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


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
) -> str:
    """Write ``dcp_state`` (every rank) and ``extra`` (rank 0) into ``save_dir/tag``. Files go to a
    hidden temporary directory that is renamed once complete; ``latest`` moves after that."""
    root = Path(save_dir)
    final, tmp = root / tag, root / f".tmp-{tag}"
    if is_rank_0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    with _single_process_quiet():
        dcp.save(dcp_state, checkpoint_id=str(tmp))
    if is_rank_0:
        torch.save(extra, tmp / EXTRA_STATE)
        _fsync_dir(tmp)
        if final.exists():
            old = root / f".old-{tag}"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        if save_latest:
            write_latest(root, tag)
        rotate(root, max_num=max_num, max_mem=max_mem, keep={tag})
    barrier()
    return str(final)


def write_latest(root: Path, tag: str) -> None:
    """Point ``root/latest`` at ``tag`` with an atomic replace."""
    tmp = root / f".{LATEST}.tmp"
    tmp.write_text(tag)
    os.replace(tmp, root / LATEST)


def resolve(load_dir: str, tag: Optional[str] = None) -> str:
    """The checkpoint directory for ``tag`` (default: the one ``latest`` names), checked to be complete."""
    root = Path(load_dir)
    if tag is None:
        pointer = root / LATEST
        if not pointer.is_file():
            raise FileNotFoundError(f"no checkpoint to load: {pointer} does not exist (pass tag= or save one first)")
        tag = pointer.read_text().strip()
    path = root / tag
    for required in (METADATA, EXTRA_STATE):
        if not (path / required).is_file():
            raise FileNotFoundError(f"checkpoint {path} is incomplete: {path / required} is missing")
    return str(path)


def load(path: str, dcp_state: dict[str, Any]) -> dict[str, Any]:
    """Load DCP shards into ``dcp_state`` in place (pickle-safe) and return the extra state."""
    try:
        with _single_process_quiet():
            dcp.load(dcp_state, checkpoint_id=path, planner=SafeLoadPlanner())
    except Exception as err:  # DCP wraps per-rank failures; name the checkpoint in the message
        raise RuntimeError(f"loading checkpoint {path} failed: {err}") from err
    return torch.load(Path(path) / EXTRA_STATE, weights_only=True)


def rotate(root: Path, max_num: int, max_mem: float, keep: set[str]) -> list[str]:
    """Delete the oldest complete checkpoints until at most ``max_num`` remain and they use at most
    ``max_mem`` GB; tags in ``keep`` and the one ``latest`` names are never deleted."""
    pointer = root / LATEST
    protected = set(keep) | ({pointer.read_text().strip()} if pointer.is_file() else set())
    tags = sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / METADATA).exists()),
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
        yield

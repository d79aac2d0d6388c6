"""The one checkpoint writer: every checkpoint directory of this package is written by
:func:`write_checkpoint`.

A save writes its files into a hidden temporary directory ``<root>/.tmp-<tag>``; once every rank
is done, rank 0 renames it to ``<root>/<tag>``, then (when asked) points ``<root>/latest`` at it,
then deletes the oldest checkpoints beyond ``max_num`` / ``max_mem`` GB (never the new one, the one
``latest`` names, nor the tags in ``keep``, such as the checkpoint a run resumed from). The
directory is fsynced after the rename and after ``latest`` moves, so both survive a power loss; a
crash before the rename leaves the previous checkpoint and ``latest`` untouched.

What goes into the temporary directory is the caller's: DCP shards with their CRC-32 records and
``extra_state.pt`` (:func:`write_dcp`), DeepSpeed's ``engine.save_checkpoint``, or both.
"""

from __future__ import annotations

import math
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Optional, Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from lightrft_lightning.checkpoint.dcp import EXTRA_STATE, LATEST, METADATA, quiet_single_process, read_latest, write_crc

TMP_PREFIX = ".tmp-"


@dataclass
class Publish:
    """How :func:`write_checkpoint` makes a written checkpoint visible. Our strategies' ``save_checkpoint`` and
    :class:`~lightrft_lightning.checkpoint.DCPCheckpointIO` take one as Lightning's ``storage_options``;
    as ``Trainer.save_checkpoint`` returns nothing, :func:`write_checkpoint` leaves the save's handle in
    ``handle`` (None on the ranks that wrote nothing).

    Args:
        latest: point ``<root>/latest`` at the new checkpoint.
        max_num: keep at most this many checkpoints in ``<root>`` (None: no rotation).
        max_mem: keep at most this many GB of checkpoints in ``<root>``.
        keep: tags rotation never deletes (the new one and ``latest``'s are always kept).
        is_checkpoint: which directories of ``<root>`` rotation counts (default: DCP ones, with ``.metadata``).
        async_save: return once the state is staged in memory; the files are written in the background and
            the checkpoint is published when the returned handle's ``wait()`` is called (every rank).
    """

    latest: bool = False
    max_num: Optional[int] = None
    max_mem: float = math.inf
    keep: Collection[str] = ()
    is_checkpoint: Optional[Callable[[Path], bool]] = None
    async_save: bool = False
    handle: Optional["SaveHandle"] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_num is not None and (isinstance(self.max_num, bool) or not isinstance(self.max_num, int)
                                         or self.max_num < 1):
            raise ValueError(f"Publish.max_num={self.max_num!r} is invalid; accepted: None or an integer >= 1")
        if isinstance(self.max_mem, bool) or not isinstance(self.max_mem, (int, float)) or not self.max_mem > 0:
            raise ValueError(f"Publish.max_mem={self.max_mem!r} is invalid; accepted: a number of GB > 0")
        for name in ("latest", "async_save"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Publish.{name} must be a bool, got {getattr(self, name)!r}")

    @classmethod
    def of(cls, storage_options: Any, owner: str) -> "Publish":
        """``storage_options`` of a Lightning ``save_checkpoint`` call as a :class:`Publish` (None: the default)."""
        if storage_options is None:
            return cls()
        if not isinstance(storage_options, cls):
            raise TypeError(f"{owner}.save_checkpoint: storage_options={storage_options!r} is not supported; "
                            "accepted: None or a lightrft_lightning.checkpoint.Publish")
        return storage_options


class SaveHandle:
    """A save that :func:`write_checkpoint` started. ``wait()`` (every rank) finishes it: waits for the files,
    then renames, moves ``latest`` and rotates; it returns the checkpoint path. A synchronous save
    comes back finished."""

    def __init__(self, path: str, finish: Optional[Callable[[], None]]) -> None:
        self.path = path
        self._finish = finish

    @property
    def done(self) -> bool:
        return self._finish is None

    def wait(self) -> str:
        finish, self._finish = self._finish, None
        if finish is not None:
            finish()
        return self.path


Writer = Callable[[Path], Optional[Future]]


def write_checkpoint(path: Union[str, os.PathLike], fill: Writer, options: Optional[Publish] = None, *,
                     is_rank_0: bool = True, barrier: Callable[[], None] = lambda: None) -> SaveHandle:
    """Write the checkpoint directory ``path`` (every rank calls it): ``fill(tmp)`` writes into the hidden
    temporary directory (returning a ``Future`` when it writes in the background), then
    :func:`place` renames it to ``path`` and applies ``options``. Returns the save's handle."""
    options = options if options is not None else Publish()
    final = Path(path)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}"
    if is_rank_0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    written = fill(tmp)  # a Future only when options.async_save

    def finish() -> None:
        if written is not None:
            written.result()
        place(tmp, final, options, is_rank_0=is_rank_0, barrier=barrier)

    handle = SaveHandle(str(final), finish)
    if written is None:
        handle.wait()
    options.handle = handle
    return handle


def place(tmp: Path, final: Path, options: Publish, *, is_rank_0: bool = True,
          barrier: Callable[[], None] = lambda: None) -> None:
    """Once every rank wrote its files into ``tmp``: rank 0 renames it to ``final``, moves ``latest``
    and rotates, fsyncing the directory after each change."""
    barrier()
    if is_rank_0:
        root = final.parent
        fsync_dir(tmp)
        _replace_dir(tmp, final)
        fsync_dir(root)
        if options.latest:
            write_latest(root, final.name)
        if options.max_num is not None or options.max_mem != math.inf:
            rotate(root, options.max_num or math.inf, options.max_mem, keep={final.name, *options.keep},
                   is_checkpoint=options.is_checkpoint)
    barrier()


# ---------------------------------------------------------------------- DCP payload
def write_dcp(tmp: Path, dcp_state: dict[str, Any], extra: dict[str, Any], *, async_save: bool = False,
              no_dist: bool = False, is_rank_0: bool = True) -> Optional[Future]:
    """Write ``dcp_state`` (every rank, as DCP shards) and ``extra`` (rank 0, ``extra_state.pt``) into
    ``tmp`` with their CRC-32 records. With ``async_save`` DCP's ``async_save`` stages the state and
    returns; the Future completes when every file is written. ``no_dist`` writes from this process
    alone even when a process group exists."""
    rank = 0 if no_dist or not dist.is_initialized() else dist.get_rank()

    def write_rest() -> None:
        # DCP's FileSystemWriter(sync_files=True) fsyncs its shards and .metadata; these files are ours
        files = write_crc(tmp, rank)
        if is_rank_0:
            torch.save(extra, tmp / EXTRA_STATE)
            files += [tmp / EXTRA_STATE, *write_crc(tmp, rank, names=[EXTRA_STATE])]
        for file in files:
            _fsync_file(file)

    with quiet_single_process():
        if not async_save:
            dcp.save(dcp_state, checkpoint_id=str(tmp), no_dist=no_dist)
            write_rest()
            return None
        written = dcp.async_save(dcp_state, checkpoint_id=str(tmp), no_dist=no_dist,
                                 process_group=None if no_dist else _async_group(), async_stager=_stager())
    return _background().submit(lambda: (written.result(), write_rest()))


def save(save_dir: str, tag: str, dcp_state: dict[str, Any], extra: dict[str, Any], *, max_num: int = 3,
         max_mem: float = 1000, save_latest: bool = True, is_rank_0: bool = True,
         barrier: Callable[[], None] = lambda: None, no_dist: bool = False, async_save: bool = False) -> SaveHandle:
    """Publish ``dcp_state`` and ``extra`` (:func:`write_dcp`) as the checkpoint ``save_dir/tag``,
    moving ``latest`` (``save_latest``) and keeping at most ``max_num`` checkpoints and ``max_mem`` GB."""
    options = Publish(latest=save_latest, max_num=max_num, max_mem=max_mem, async_save=async_save)
    return write_checkpoint(Path(save_dir) / tag,
                   lambda tmp: write_dcp(tmp, dcp_state, extra, async_save=async_save, no_dist=no_dist,
                                         is_rank_0=is_rank_0),
                   options, is_rank_0=is_rank_0, barrier=barrier)


_ASYNC_GROUP: Any = None
_BACKGROUND: Optional[ThreadPoolExecutor] = None
_STAGER: Any = None


def staging_options() -> Any:
    """How an async save copies the state off the device before returning: on CUDA into pinned host
    buffers with non-blocking copies (DCP's default stager copies into pageable memory, a slow synchronous
    copy on every save); on CPU a plain copy. Staging itself stays synchronous, so training may change the
    weights as soon as the save returns."""
    from torch.distributed.checkpoint.staging import StagingOptions

    cuda = torch.cuda.is_available()
    return StagingOptions(use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=False,
                          use_non_blocking_copy=cuda)


def _stager() -> Any:
    """One stager per process: its pinned buffers are reused by the next save."""
    global _STAGER
    if _STAGER is None:
        from torch.distributed.checkpoint.staging import DefaultStager

        _STAGER = DefaultStager(staging_options())
    return _STAGER


def _background() -> ThreadPoolExecutor:
    global _BACKGROUND
    if _BACKGROUND is None:
        _BACKGROUND = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightrft-ckpt")
    return _BACKGROUND


def _async_group() -> Any:
    """A gloo group of its own for async saves, so their background collectives never interleave
    with training collectives on the default group."""
    global _ASYNC_GROUP
    if _ASYNC_GROUP is None and dist.is_initialized():
        _ASYNC_GROUP = dist.new_group(backend="gloo")
    return _ASYNC_GROUP


# ---------------------------------------------------------------------- directory operations
def write_latest(root: Path, tag: str) -> None:
    """Point ``root/latest`` at ``tag`` with an atomic replace, durable once this returns."""
    tmp = Path(root) / f".{LATEST}.tmp"
    tmp.write_text(tag)
    _fsync_file(tmp)
    os.replace(tmp, Path(root) / LATEST)
    fsync_dir(Path(root))


def rotate(root: Path, max_num: float, max_mem: float, keep: Collection[str],
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


def remove_partial(root: Path) -> None:
    """Delete the temporary directories that saves which died mid-write left in ``root``."""
    for stale in Path(root).glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _replace_dir(src: Path, dst: Path) -> None:
    if dst.exists():
        old = dst.parent / f".old-{dst.name}"
        shutil.rmtree(old, ignore_errors=True)
        dst.rename(old)
        src.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        src.rename(dst)

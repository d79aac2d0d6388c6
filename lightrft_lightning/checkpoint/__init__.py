"""Checkpoint directories: :mod:`.publish` writes them (the one writer: temporary directory, rename,
``latest``, rotation, asynchronous saves), :mod:`.dcp` reads and verifies them, and
:class:`DCPCheckpointIO` plugs them into Lightning."""

from lightrft_lightning.checkpoint.checkpoint_io import DCPCheckpointIO
from lightrft_lightning.checkpoint.dcp import (
    CRC_PREFIX,
    EXTRA_STATE,
    LATEST,
    METADATA,
    CheckpointError,
    SafeFileSystemReader,
    SafeLoadPlanner,
    load,
    load_extra,
    load_full,
    read_latest,
    read_state_dict,
    resolve,
    verify,
)
from lightrft_lightning.checkpoint.publish import (
    Publish,
    SaveHandle,
    write_checkpoint,
    remove_partial,
    rotate,
    save,
    write_dcp,
    write_latest,
)

__all__ = [
    "CRC_PREFIX", "EXTRA_STATE", "LATEST", "METADATA", "CheckpointError", "DCPCheckpointIO", "Publish",
    "SafeFileSystemReader", "SafeLoadPlanner", "SaveHandle", "load", "load_extra", "load_full", "read_latest",
    "read_state_dict", "remove_partial", "resolve", "rotate", "save", "verify", "write_checkpoint", "write_dcp",
    "write_latest",
]

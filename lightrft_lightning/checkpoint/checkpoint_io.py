"""`DCPCheckpointIO`: Lightning's ``CheckpointIO`` plugin writing DCP checkpoint directories through
the one writer, for single-process strategies."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from lightrft_lightning.checkpoint.dcp import METADATA, load_extra, load_full
from lightrft_lightning.checkpoint.publish import Publish, SaveHandle, write_checkpoint, write_dcp


class DCPCheckpointIO(CheckpointIO):
    """Lightning ``CheckpointIO`` that writes a checkpoint as a DCP directory (weights and optimizer
    states as DCP shards, the rest in ``extra_state.pt``) from one process, atomically, and reads
    it back without a template. For single-process strategies (``LightRFTFake``):
    ``Trainer(plugins=[DCPCheckpointIO()])``. ``storage_options`` may be a
    :class:`~lightrft_lightning.checkpoint.Publish` (``latest``, rotation, ``async_save``)."""

    TENSOR_KEYS = ("state_dict", "optimizer_states")

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> SaveHandle:
        options = Publish.of(storage_options, type(self).__name__)
        dcp_state = {k: checkpoint[k] for k in self.TENSOR_KEYS if k in checkpoint}
        extra = {k: v for k, v in checkpoint.items() if k not in dcp_state}
        return write_checkpoint(path, lambda tmp: write_dcp(tmp, dcp_state, extra, async_save=options.async_save, no_dist=True),
                       options)

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

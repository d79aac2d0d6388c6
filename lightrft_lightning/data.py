"""Prompt data: rows from a JSONL file or an in-code list, and a sampler whose position is saved in
the checkpoint, so a resumed run neither replays nor skips prompts."""

from __future__ import annotations

import json
import os
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

Row = dict[str, Any]


def check_prompt_file(path: str) -> None:
    """Raise unless ``path`` is an existing file."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"prompt file {path!r} is a directory; accepted: a JSONL file, one object per line")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path!r} does not exist; accepted: a JSONL file, one object per line")


class PromptDataset(Dataset):
    """Rows ``{"prompt": str, ...}``; keys besides the prompt are metadata passed to reward functions.
    ``names[i]`` is how errors name row ``i`` (default ``"prompt row i"``)."""

    def __init__(self, rows: Sequence[Union[str, Row]], prompt_key: str = "prompt",
                 names: Optional[Sequence[str]] = None) -> None:
        self.rows: list[Row] = []
        for i, row in enumerate(rows):
            name = names[i] if names is not None else f"prompt row {i}"
            if not isinstance(row, (str, Mapping)):
                raise ValueError(f"{name} ({type(row).__name__} {row!r:.40}) is invalid; accepted: a string or a "
                                 f"mapping with a string {prompt_key!r}")
            row = {prompt_key: row} if isinstance(row, str) else dict(row)
            if not isinstance(row.get(prompt_key), str):
                raise ValueError(f"{name} has no string field {prompt_key!r}; accepted: "
                                 f"a string or a mapping with a string {prompt_key!r} (got keys {sorted(row)})")
            row["prompt"] = row.pop(prompt_key)
            self.rows.append(row)
        if not self.rows:
            raise ValueError("PromptDataset: no prompts; accepted: at least one row")

    @classmethod
    def from_jsonl(cls, path: str, prompt_key: str = "prompt") -> "PromptDataset":
        check_prompt_file(path)
        rows, names = [], []
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise ValueError(f"{path}:{n}: not UTF-8 text ({err.reason})") from err
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{n}: not valid JSON ({err.msg})") from err
                    names.append(f"{path}:{n}")
        if not rows:
            raise ValueError(f"prompt file {path!r} holds no prompts; accepted: a JSONL file, one object per line")
        return cls(rows, prompt_key, names)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Row:
        return {**self.rows[index], "index": index}


def collate_prompts(rows: list[Row]) -> dict[str, Any]:
    """``{"rows": [...], "index": LongTensor}``: the tensor lets Lightning infer the batch size."""
    return {"rows": rows, "index": torch.tensor([row["index"] for row in rows])}


class ResumableSampler(DistributedSampler):
    """Seeded per-epoch shuffle, split over ranks by global batch, that can start mid-epoch.

    Global batch ``k`` is ``perm[k*B*W : (k+1)*B*W]`` (``B`` rows per rank, ``W`` ranks), rank ``r``
    taking every ``W``-th row from ``r``. ``consumed`` (rows of the current epoch already trained
    on, over all ranks) is where the next iteration starts. ``len`` is always a full epoch, so
    Lightning's batch counter, restored from the same checkpoint, ends the epoch at the right place.
    """

    def __init__(self, dataset: Dataset, batch_size: int, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.consumed = 0
        global_batch = batch_size * num_replicas
        if len(dataset) < global_batch:
            raise ValueError(f"{len(dataset)} prompts cannot fill one batch of batch_size={batch_size} "
                             f"x {num_replicas} ranks; accepted: a smaller batch_size or more prompts")
        self.num_samples = len(dataset) // global_batch * batch_size

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.dataset), generator=g).tolist()
        else:
            order = list(range(len(self.dataset)))
        order = order[: self.num_samples * self.num_replicas]
        return iter(order[self.consumed + self.rank:: self.num_replicas])

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.consumed = 0
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"resuming with seed={self.seed} but the checkpoint's sampler used seed={state['seed']}; "
                             "accepted: the same seed (another seed would replay and skip prompts)")
        self.epoch, self.consumed = state["epoch"], state["consumed"]


class PromptDataModule(pl.LightningDataModule):
    """Prompts for RLHF from ``path`` (JSONL) or ``prompts`` (a list of strings or rows).

    Args:
        path: a JSONL file, one object per line with a ``prompt_key`` field (other fields are metadata).
        prompts: in-code prompts instead of ``path``.
        batch_size: prompts per training step on each rank.
        shuffle, seed: the per-epoch shuffle.
        prompt_key: the field holding the prompt.
        val_path, val_prompts: optional validation prompts (same format).
    """

    def __init__(self, path: Optional[str] = None, prompts: Optional[list[Union[str, Row]]] = None,
                 batch_size: int = 8, shuffle: bool = True, seed: int = 0, prompt_key: str = "prompt",
                 val_path: Optional[str] = None, val_prompts: Optional[list[Union[str, Row]]] = None) -> None:
        super().__init__()
        if (path is None) == (prompts is None):
            raise ValueError("PromptDataModule: give exactly one of path= (a JSONL file) or prompts= (a list)")
        if val_path is not None and val_prompts is not None:
            raise ValueError("PromptDataModule: give at most one of val_path= (a JSONL file) or val_prompts= (a list)")
        for name, value in (("prompts", prompts), ("val_prompts", val_prompts)):
            if value is not None and (isinstance(value, str) or not isinstance(value, Sequence) or not value):
                raise ValueError(f"PromptDataModule.{name}={value!r:.80} is invalid; accepted: a non-empty list of "
                                 "strings or rows")
        for value in (path, val_path):
            if value is not None:
                check_prompt_file(value)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"PromptDataModule.batch_size={batch_size!r} is invalid; accepted: an integer >= 1")
        if not isinstance(prompt_key, str) or not prompt_key:
            raise ValueError(f"PromptDataModule.prompt_key={prompt_key!r} is invalid; accepted: a non-empty string")
        self.path, self.prompts, self.batch_size = path, prompts, batch_size
        self.shuffle, self.seed, self.prompt_key = shuffle, seed, prompt_key
        self.val_path, self.val_prompts = val_path, val_prompts
        self.dataset: Optional[PromptDataset] = None
        self.val_dataset: Optional[PromptDataset] = None
        self.sampler: Optional[ResumableSampler] = None
        self._pending_state: Optional[dict] = None

    def setup(self, stage: str) -> None:
        if self.dataset is None:
            self.dataset = (PromptDataset.from_jsonl(self.path, self.prompt_key) if self.path is not None
                            else PromptDataset(self.prompts, self.prompt_key))

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
        self.sampler = ResumableSampler(self.dataset, self.batch_size, world, rank, self.shuffle, self.seed)
        if self._pending_state is not None:
            self.sampler.load_state_dict(self._pending_state)
            self._pending_state = None
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler, collate_fn=collate_prompts)

    def val_dataloader(self) -> Union[DataLoader, list]:
        if self.val_path is None and self.val_prompts is None:
            return []
        if self.val_dataset is None:
            self.val_dataset = (PromptDataset.from_jsonl(self.val_path, self.prompt_key) if self.val_path is not None
                                else PromptDataset(self.val_prompts, self.prompt_key))
        return DataLoader(self.val_dataset, batch_size=self.batch_size, shuffle=False, collate_fn=collate_prompts)

    def state_dict(self) -> dict[str, Any]:
        if self.sampler is None:
            return {}
        trainer = self.trainer
        if trainer is not None and trainer.training:
            # rows of this epoch whose training_step has run (checkpoints are saved after it)
            batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            self.sampler.consumed = batches * self.batch_size * self.sampler.num_replicas
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "sampler" in state:
            self._pending_state = state["sampler"]
            if self.sampler is not None:
                self.sampler.load_state_dict(self._pending_state)
                self._pending_state = None

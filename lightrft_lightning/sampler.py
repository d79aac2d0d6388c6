"""The training sampler of prompt data: a seeded per-epoch stream of rows over the ranks whose position is
saved in the checkpoint (a resumed run neither replays nor skips prompts) and from which a rollout can draw
more rows than the step's batch (a refill, an asynchronous pipeline): :class:`ResumableSampler`, and
:func:`training_sampler`, the one of a Trainer's training DataLoader."""

from __future__ import annotations

from typing import Any, Iterator, Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """Seeded per-epoch shuffle, split over ranks by global batch, that can start mid-epoch and lend
    rows to a rollout that refills (:meth:`draw`).

    The epoch's order is one stream of positions, read by a cursor, ``consumed`` (positions of the
    current epoch drawn so far, over all ranks): each global batch takes the next ``B*W`` positions
    (``B`` rows per rank, ``W`` ranks, rank ``r`` taking every ``W``-th from ``r``) when the DataLoader
    asks for it, and :meth:`draw` takes the next ``k*W`` for a refill. So a row drawn for a refill is
    not drawn again in the epoch, and an epoch whose refills used rows ends early (only whole batches
    are given). ``len`` is always a full epoch, so Lightning's batch counter, restored from the same
    checkpoint, ends an epoch without refills at the right place.

    Resume: :meth:`state_dict` takes the number of batches of the epoch trained; rows of batches the
    DataLoader fetched ahead but that were not trained are saved as ``pending`` and come first after
    a resume, then the stream continues at the cursor.
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
        self.pending: list[int] = []  # this rank's rows of fetched, untrained batches, given first
        self._batches: list[list[int]] = []  # this rank's rows of each batch given by the current iterator
        self._trained_before = 0  # batches of this epoch trained before the current iterator started
        self._trained: Optional[int] = None  # the count the last state_dict was given
        self._order: Optional[tuple[int, list[int]]] = None

    def epoch_order(self) -> list[int]:
        """The current epoch's positions -> dataset indices (all ranks), whole global batches only."""
        if self._order is None or self._order[0] != self.epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + self.epoch)
                order = torch.randperm(len(self.dataset), generator=g).tolist()
            else:
                order = list(range(len(self.dataset)))
            self._order = (self.epoch, order[: self.num_samples * self.num_replicas])
        return self._order[1]

    def __iter__(self) -> Iterator[int]:
        order, step = self.epoch_order(), self.batch_size * self.num_replicas
        pending, self.pending, self._batches = self.pending, [], []
        self._trained_before = self._trained if self._trained is not None else self._trained_before
        for start in range(0, len(pending), self.batch_size):
            self._batches.append(pending[start: start + self.batch_size])
            yield from self._batches[-1]
        while self.consumed + step <= len(order):
            rows = order[self.consumed + self.rank: self.consumed + step: self.num_replicas]
            self.consumed += step  # before the rows leave: the DataLoader pulls a whole batch at once
            self._batches.append(rows)
            yield from rows

    def draw(self, rows: int) -> list[int]:
        """The next ``rows`` dataset indices of this rank's part of the stream (``rows x W`` positions
        over all ranks: every rank must call it with the same ``rows``); fewer at the end of the epoch."""
        order = self.epoch_order()
        rows = max(0, min(rows, (len(order) - self.consumed) // self.num_replicas))
        out = order[self.consumed + self.rank: self.consumed + rows * self.num_replicas: self.num_replicas]
        self.consumed += rows * self.num_replicas
        return out

    def draw_rows(self, rows: int) -> list[Any]:
        """The dataset rows of :meth:`draw` (none for ``rows <= 0``)."""
        return [self.dataset[i] for i in self.draw(rows)] if rows > 0 else []

    def rows_left(self) -> int:
        """How many rows :meth:`draw` can still give this rank in this epoch."""
        return (len(self.epoch_order()) - self.consumed) // self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.consumed, self.pending, self._batches = 0, [], []
            self._trained_before, self._trained = 0, None
        self.epoch = epoch

    def state_dict(self, trained_batches: Optional[int] = None) -> dict[str, Any]:
        """The sampler's position; ``trained_batches``: batches of this epoch trained so far (None: the
        count given last time, else every batch given so far)."""
        if trained_batches is not None:
            self._trained = trained_batches
        trained = self._trained if self._trained is not None else self._trained_before + len(self._batches)
        given = self._batches[max(0, trained - self._trained_before):]
        pending = [i for batch in given for i in batch] + self.pending
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "pending": pending,
                "trained": trained}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"resuming with seed={self.seed} but the checkpoint's sampler used seed={state['seed']}; "
                             "accepted: the same seed (another seed would replay and skip prompts)")
        self.epoch, self.consumed = state["epoch"], state["consumed"]
        self.pending = list(state.get("pending", []))
        self._batches, self._order = [], None
        # checkpoints from before refills: the batches trained follow from the cursor
        self._trained = state.get("trained", self.consumed // (self.batch_size * self.num_replicas))
        self._trained_before = self._trained


def training_sampler(trainer: pl.Trainer, user: str, alternative: str) -> ResumableSampler:
    """The :class:`ResumableSampler` of the Trainer's training DataLoader; ``user`` (who draws from it) and
    ``alternative`` (what works without one) word the error without one."""
    loader = trainer.train_dataloader
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, ResumableSampler):
        sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    if not isinstance(sampler, ResumableSampler):
        raise ValueError(f"{user} from the training DataLoader's sampler, and this one has {type(sampler).__name__}; "
                         "accepted: a DataLoader with a lightrft_lightning.sampler.ResumableSampler (PromptDataModule's), "
                         f"or {alternative}")
    return sampler

"""`Experience`: the scored rollout a learner trains on, whatever produced it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator, Optional

from torch import Tensor


@dataclass
class Experience:
    """One rollout: ``[N, L]`` sequences (prompt + response, right-padded) and ``[N, L-1]`` per-token
    tensors aligned with the tokens they predict (``action_mask`` marks response tokens); ``rewards``
    are the ``[N]`` sequence rewards. ``rollout_logp``: the log-probs the engine that sampled the
    responses gave them (mu; 0 outside ``action_mask``), ``old_logp`` the learner's (pi_old); ``versions``
    the ``[N]`` weight versions (learner steps) that generated each sample (asynchronous rollouts)."""

    input_ids: Tensor
    attention_mask: Tensor
    action_mask: Tensor
    old_logp: Optional[Tensor] = None
    ref_logp: Optional[Tensor] = None
    values: Optional[Tensor] = None
    advantages: Optional[Tensor] = None
    returns: Optional[Tensor] = None
    rewards: Optional[Tensor] = None
    rollout_logp: Optional[Tensor] = None
    versions: Optional[Tensor] = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def slice(self, start: int, stop: int) -> "Experience":
        return Experience(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[start:stop])
                             for f in dataclasses.fields(self)})

    def micro_batches(self, size: int) -> Iterator["Experience"]:
        """Consecutive slices of ``size`` samples."""
        for start in range(0, len(self), size):
            yield self.slice(start, start + size)

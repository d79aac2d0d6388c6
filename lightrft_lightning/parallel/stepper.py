"""`Stepper`: LightRFT's optimizer-step semantics for one trained model, on every backend.

A step is ``accumulation_steps`` micro-batches: each micro-batch loss is divided by that number, the
last micro-batch of a step is its boundary, and at the boundary the global gradient norm is clipped
to ``max_norm`` (0: not clipped); a step whose norm is not finite is skipped (gradients dropped,
counted), else the optimizer steps, the gradients are zeroed and the scheduler steps. The backend
supplies how to clip and step (:meth:`Stepper.step`); DeepSpeed engines accumulate, clip and skip
themselves and report what they did (:meth:`Stepper.record`). No Lightning here: the strategies
call it from both call shapes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

log = logging.getLogger(__name__)


@dataclass
class Stepper:
    """The optimizer, scheduler and step counters of one trained model, and the step rule above."""

    optimizer: Any = None
    scheduler: Any = None
    name: str = "model"
    micro_steps: int = 0
    steps: int = 0
    skipped_steps: int = 0
    grad_norm: float = 0.0
    model: Any = field(default=None, repr=False)  # the model the backend clips and syncs

    def is_boundary(self, accumulation_steps: int) -> bool:
        """Whether the next micro-step ends an optimizer step."""
        return (self.micro_steps + 1) % accumulation_steps == 0

    @staticmethod
    def scale(loss: torch.Tensor, accumulation_steps: int) -> torch.Tensor:
        """A micro-batch's share of the step's loss."""
        return loss / accumulation_steps if accumulation_steps > 1 else loss

    def step(self, accumulation_steps: int, max_norm: float, clip: Callable[[float], torch.Tensor],
             optimizer_step: Callable[[], Any], on_skip: Optional[Callable[[], Any]] = None) -> bool:
        """One micro-step: at a boundary, ``clip(max_norm)`` returns the global norm; a finite norm gets
        ``optimizer_step()``, zeroed gradients and a scheduler step, another zeroed gradients and
        ``on_skip()``. Returns whether the optimizer stepped."""
        self.micro_steps += 1
        if self.micro_steps % accumulation_steps:
            return False
        norm = float(clip(max_norm))
        finite = math.isfinite(norm)
        if finite:
            optimizer_step()
        self.optimizer.zero_grad(set_to_none=True)
        if not finite and on_skip is not None:
            on_skip()
        stepped = self.record(norm, skipped=not finite)
        if stepped and self.scheduler is not None:
            self.scheduler.step()
        return stepped

    def record(self, norm: Optional[float], skipped: bool) -> bool:
        """Count a boundary whose gradient norm was ``norm`` (None: unknown), skipped or not; returns
        whether it stepped."""
        self.grad_norm = float("nan") if norm is None else float(norm)
        if skipped:
            self.skipped_steps += 1
            log.warning("%s: gradient norm is %s, step skipped (%d skipped so far)", self.name, self.grad_norm,
                        self.skipped_steps)
            return False
        self.steps += 1
        return True

    def counters(self) -> dict[str, int]:
        """The step counters a checkpoint keeps."""
        return {"micro_steps": self.micro_steps, "steps": self.steps, "skipped_steps": self.skipped_steps}

    def load_counters(self, counters: dict[str, int]) -> None:
        for key in ("micro_steps", "steps", "skipped_steps"):
            if key in counters:
                setattr(self, key, counters[key])

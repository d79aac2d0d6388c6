"""Real vLLM servers for tests and benchmarks: started with ``lightrft-lightning serve`` on 127.0.0.1 and
free ports, each in a session of its own, and killed (the whole session: API server, engine core,
workers) on exit, failure or interrupt. Nothing is left behind, nothing waits forever."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Iterator, Optional

from lightning.fabric.plugins.environments.lightning import find_free_network_port

from lightrft_lightning.engines.server import ServerError, wait_healthy
from tests.vllm.common import ENV

START_TIMEOUT_S = 420  # a server on 2 shared cores: ~60 s alone, several minutes when others load too


class Server:
    """One started server: its URL, process and log file."""

    def __init__(self, model: str, args: list[str], env: dict[str, str]) -> None:
        self.port = find_free_network_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix=f"vllm-server-{self.port}-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "lightrft_lightning.cli", "serve", "--model", model, "--port", str(self.port), *args]
        self.process = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                        env={**os.environ, **ENV, **env})

    def log_tail(self, chars: int = 4000) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()[-chars:]

    def kill(self) -> None:
        """Stop the server's whole session: SIGTERM, then SIGKILL after 20 s."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # the engine core and workers too
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        self.log.close()


@contextlib.contextmanager
def served(model: str, count: int = 1, args: Optional[list[str]] = None, api_key: Optional[str] = None,
           timeout_s: float = START_TIMEOUT_S) -> Iterator[list[Server]]:
    """``count`` servers of ``model`` (started together), healthy, killed on exit."""
    env = {"VLLM_API_KEY": api_key} if api_key else {}
    servers: list[Server] = []
    try:
        for _ in range(count):
            servers.append(Server(model, list(args or []), env))
        deadline = time.monotonic() + timeout_s
        for server in servers:
            try:
                wait_healthy(server.url, max(1.0, deadline - time.monotonic()), server.process)
            except ServerError as err:
                raise ServerError(f"{err}\n--- server log ---\n{server.log_tail()}") from None
        yield servers
    finally:
        for server in servers:
            server.kill()


def main() -> None:
    """``python -m tests.vllm.servers MODEL COUNT [serve args]``: start servers, print their URLs, wait
    for stdin to close (the parent's end of a pipe), then kill them."""
    model, count, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    with served(model, count, args) as servers:
        print("URLS " + ",".join(s.url for s in servers), flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()

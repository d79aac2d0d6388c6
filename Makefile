# Two commands from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU machines get the CPU build of torch (a local wheel here); CUDA machines the default build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) examples/grpo_demo.py

test: install
	$(PY) -m pytest -q -x --durations=10

clean:
	rm -rf $(VENV) build *.egg-info

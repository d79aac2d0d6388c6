#!/usr/bin/env bash
# GPU checks for a lent CUDA machine, one command, no package index needed (tests/gpu/README.md):
#   bash tests/gpu/run_gpu_checks.sh        # PY=... picks the interpreter; results also go to $OUT when set
# One line per check (CHECK <name>: PASS|FAIL|SKIP (why)), then the counts; the whole run stays under
# 500 s. Without CUDA it is a dry run: every check SKIPs, exit 0. The checks: tests/scripts/gpu_checks.py.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-$(command -v python3 || command -v python)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" tests/scripts/gpu_checks.py "$@"

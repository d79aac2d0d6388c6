"""Every rank of an FSDP2 script exits 0, run after run: no gloo abort at interpreter exit."""

import pytest

from tests.launch import script_result, torchrun

RUNS = 3


@pytest.mark.multiprocess
@pytest.mark.parametrize("ending", [(), ("--destroy",)], ids=["no-destroy", "barrier-and-destroy"])
def test_multi_fit_fsdp_script_exits_cleanly_every_time(ending):
    for run in range(RUNS):
        proc = torchrun("clean_exit.py", 2, *ending, check=False, timeout=240)
        output = proc.stdout + proc.stderr
        assert "terminate called" not in output, f"run {run}: a rank aborted at exit\n{output[-3000:]}"
        assert proc.returncode == 0, f"run {run}: rc={proc.returncode}\n{output[-3000:]}"
        assert script_result(proc)["loss"] > 0

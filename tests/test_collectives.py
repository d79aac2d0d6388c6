"""The shared LightRFT API under a real 2-process gloo group."""

from tests.launch import torchrun


def test_collectives_and_rank0_print_on_two_ranks():
    proc = torchrun("collectives.py", 2, timeout=120)
    assert "PRINTED-BY-RANK-0" in proc.stdout
    assert "PRINTED-BY-RANK-1" not in proc.stdout

"""tune_malloc: glibc keeps freed tensor memory instead of page-faulting it back (in fresh processes)."""

import os
import platform
import subprocess
import sys

import pytest

from worldmodel.allocator import ENV_VARS, MMAP_THRESHOLD, tune_malloc

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# page faults while 32 tensors of 4 MiB are allocated and filled, summed over rounds 1..5 (round 0 warms up)
FAULTS = """
import resource, sys, torch
from worldmodel.allocator import tune_malloc
applied = tune_malloc() if sys.argv[1] == "tuned" else False
faults = 0
for round in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    xs = [torch.ones(1 << 20) for _ in range(32)]
    if round:
        faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del xs
print(applied, faults)
"""


def _faults(mode: str) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_tuned_malloc_reuses_freed_memory_instead_of_faulting_it_back():
    applied, tuned = _faults("tuned")
    _, default = _faults("default")
    assert applied
    assert default > 20_000  # the default gives the freed 128 MiB back and faults it in again (1-2 rounds)
    assert tuned < 0.5 * default


def test_environment_setting_wins(monkeypatch):
    monkeypatch.setenv(ENV_VARS[1], "1073741824")
    assert tune_malloc() is False


@pytest.mark.parametrize("kwargs", [dict(mmap_threshold=0), dict(mmap_threshold=2 * MMAP_THRESHOLD),
                                    dict(trim_threshold=0)])
def test_bad_thresholds_are_rejected(kwargs):
    with pytest.raises(ValueError, match="threshold"):
        tune_malloc(**kwargs)

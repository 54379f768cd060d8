"""Shared test fixtures."""

import contextlib
import os
import tempfile
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors: intra-op threads only add synchronisation (up to 10x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _native_places_outside_the_tests() -> set:
    """The files in the places the native loops are built in outside the tests (the user cache and the
    shared temporary directory). Names only: other processes using the library refresh its mtime."""
    places = [Path(tempfile.gettempdir()) / f"ldm-worldmodel-{os.getuid()}"]
    with contextlib.suppress(RuntimeError, KeyError):
        places.append(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ldm-worldmodel")
    return {path for place in places if place.is_dir() for path in place.iterdir()}


@pytest.fixture(scope="session", autouse=True)
def native_build_dir(tmp_path_factory):
    """The native loops are built (once) in this session's temporary directory (WORLDMODEL_NATIVE_DIR, which
    subprocesses inherit), never in the user's cache or the shared temporary directory: checked at the end."""
    before = _native_places_outside_the_tests()
    directory = tmp_path_factory.mktemp("native") / "build"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORLDMODEL_NATIVE_DIR", str(directory))
        yield directory
    added = sorted(str(path) for path in _native_places_outside_the_tests() - before)
    assert not added, f"the tests wrote where the native loops are built outside the tests: {added}"

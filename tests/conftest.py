"""Shared test set-up: markers, GPU detection, the Numba simulator switch, NaN poisoning."""

from __future__ import annotations

import os

import pytest

from rawdelta._arrays import cupy_or_none, poison_allocations

from .cuda import background_compile

HAS_GPU = cupy_or_none() is not None

# Without a GPU the Numba reference kernels run in the CUDA simulator. This must be decided before
# numba is first imported, which happens lazily inside rawdelta.
if not HAS_GPU:
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")


def pytest_collection_finish(session: pytest.Session) -> None:
    # the items that will run (after -k / -m deselection)
    if any(item.nodeid == background_compile.CHECK for item in session.items) and not session.config.option.collectonly:
        background_compile.start()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with CuPy (none found)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _poison_rawdelta_allocations():
    """Every buffer rawdelta allocates starts as NaN, so an unwritten output fails the comparison."""
    with poison_allocations(True):
        yield

"""Packing of kernel arguments for launches through the driver (``launch.ProgrammaticLaunch``); no GPU needed,
the launches themselves are tested on the GPU through the forward pass that runs beside prepare."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from rawdelta.cuda import launch, tensor_map


def test_each_argument_is_at_its_pointer() -> None:
    maps = tensor_map.kernel_maps(np.arange(16, dtype=np.uint64), None)
    args = (np.int32(-7), np.float32(1.5), np.uint64(2**40 + 3), np.int64(-(2**35)), maps, np.float64(0.25))
    buf, pointers = launch.pack_kernel_params(args)
    assert len(pointers) == len(args)
    for a, ptr in zip(args, pointers):
        assert ctypes.string_at(ptr, a.nbytes) == a.tobytes(), type(a).__name__
    assert ctypes.addressof(buf) == pointers[0]


@pytest.mark.parametrize("bad", [3, 1.0, np.bool_(True), np.zeros(2, np.int32)], ids=["int", "float", "bool", "array"])
def test_arguments_of_no_fixed_size_are_refused(bad: object) -> None:
    with pytest.raises(TypeError, match="NumPy scalars of fixed size"):
        launch.pack_kernel_params((np.int32(1), bad))


def test_a_programmatic_launch_is_built_ahead() -> None:
    """The launch's driver configuration and packed arguments exist before it is called (no driver needed)."""
    pytest.importorskip("cuda.bindings", reason="cuda-bindings comes with cuda-core in the test extra")
    from types import SimpleNamespace

    kernel = SimpleNamespace(name="k", kernel=SimpleNamespace(ptr=0))
    args = (np.int32(5), np.float32(-2.0), np.uint64(7))
    prepared = launch.ProgrammaticLaunch(kernel, 300, 160, 4096, args)
    config = prepared.config
    assert (config.gridDimX, config.gridDimY, config.blockDimX, config.sharedMemBytes) == (300, 1, 160, 4096)
    assert config.numAttrs == 1 and config.attrs[0].value.programmaticStreamSerializationAllowed == 1
    pointers = (ctypes.c_uint64 * len(args)).from_address(prepared.params)
    for a, ptr in zip(args, pointers):
        assert ctypes.string_at(ptr, a.nbytes) == a.tobytes()

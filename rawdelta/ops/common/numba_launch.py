"""Launching Numba CUDA reference kernels on numpy or CuPy arrays, shared by every family's Numba backend.

numpy inputs are copied to the device (or to the Numba CUDA simulator with ``NUMBA_ENABLE_CUDASIM=1``) and
the outputs copied back; CuPy inputs are wrapped without copying and the kernels run on CuPy's current
stream, on the arrays' device.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..._arrays import empty, zeros
from .backend import numba_cuda, numba_simulator

THREADS_PER_BLOCK = 128  # the reference kernels do not tune for occupancy
# In the CUDA simulator every thread of a block is a Python thread, run at once, and each device-function call takes
# the simulator's locks: a block of many threads spends its time (and a run-to-run varying amount of it, up to 40x)
# handing those locks and the GIL around. One thread per block runs the same threads one at a time. The reference
# kernels share nothing within a block (no shared memory, no barriers), so the block size is free.
SIMULATOR_THREADS_PER_BLOCK = 1


class NumbaLauncher:
    """Moves arrays to where the kernels run and launches them, for numpy or CuPy inputs.

    numpy: inputs are copied to the device and registered outputs copied back by :meth:`finish`.
    CuPy: arrays are wrapped without copying and kernels go on CuPy's current stream.
    """

    def __init__(self, xp: Any) -> None:
        self.cuda = numba_cuda()
        self.threads_per_block = SIMULATOR_THREADS_PER_BLOCK if numba_simulator() else THREADS_PER_BLOCK
        self.xp = xp
        self.host = xp is np
        self._copy_back: list[tuple[Any, Any]] = []
        if self.host:
            self.stream = 0
        else:
            ptr = int(xp.cuda.get_current_stream().ptr)
            self.stream = self.cuda.default_stream() if ptr == 0 else self.cuda.external_stream(ptr)

    def dummy(self, ndim: int) -> Any:
        """A 1-element float32 array of `ndim` dimensions standing in for an absent input."""
        return self.put(zeros(self.xp, (1,) * ndim, np.float32))

    def put(self, x: Any) -> Any:
        """Device view (CuPy) or device copy (numpy) of an input array."""
        if x.size == 0:  # never indexed; some drivers refuse zero-byte buffers
            x = zeros(self.xp, (1,) * x.ndim, x.dtype)
        if self.host:
            return self.cuda.to_device(np.ascontiguousarray(x))
        return self.cuda.as_cuda_array(x, sync=False)

    def put_or_dummy(self, x: Any, ndim: int) -> Any:
        """:meth:`put` of an optional input `x` of `ndim` dimensions, or :meth:`dummy` when it is None."""
        return self.dummy(ndim) if x is None else self.put(x)

    def put_f32(self, x: Any) -> Any:
        """:meth:`put` of `x` as float32 (the reference kernels' arithmetic; not copied when it is float32)."""
        return self.put(x.astype(np.float32, copy=False))

    def put_f32_or_dummy(self, x: Any, ndim: int) -> Any:
        """:meth:`put_f32` of an optional input `x` of `ndim` dimensions, or :meth:`dummy` when it is None."""
        return self.dummy(ndim) if x is None else self.put_f32(x)

    def out(self, x: Any) -> Any:
        """Device array the kernel writes into; for numpy `x` it is copied back into `x` by :meth:`finish`."""
        d = self.put(x)
        if self.host and x.size:
            self._copy_back.append((d, x))
        return d

    def out_or_dummy(self, x: Any, ndim: int) -> Any:
        """:meth:`out` of an optional output `x` of `ndim` dimensions, or :meth:`dummy` when it is None."""
        return self.dummy(ndim) if x is None else self.out(x)

    def scratch(self, *shape: int) -> Any:
        """A float32 device work array that stays on the device (NaN-filled while allocations are poisoned)."""
        return self.put(empty(self.xp, shape, np.float32))

    def launch(self, kernel: Any, n_threads: int, *args: Any) -> None:
        """Launch `kernel` over `n_threads` threads (1-D, blocks of :data:`THREADS_PER_BLOCK`, in the simulator
        :data:`SIMULATOR_THREADS_PER_BLOCK`)."""
        if n_threads == 0:
            return
        tpb = min(self.threads_per_block, n_threads)
        with warnings.catch_warnings():
            # Small problems give small grids; the reference does not tune for occupancy.
            # Matched by message: numba and numba-cuda each define their own NumbaPerformanceWarning class.
            warnings.filterwarnings("ignore", message=".*under-utilization due to low occupancy")
            kernel[(n_threads + tpb - 1) // tpb, tpb, self.stream](*args)

    def finish(self) -> None:
        """Copy the registered outputs of numpy calls back to the host."""
        for d, x in self._copy_back:
            d.copy_to_host(x)
        self._copy_back.clear()


@contextlib.contextmanager
def numba_device_scope(xp: Any, stream: Any, array: Any) -> Iterator[None]:
    """For CuPy inputs: run on `stream` (CuPy's current one when None) and with Numba on `array`'s device."""
    if xp is np:
        yield
        return
    from ..._arrays import on_stream

    cuda = numba_cuda()
    with on_stream(stream), cuda.gpus[int(array.device.id)]:
        yield

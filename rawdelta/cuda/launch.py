"""Launching the registered kernels, for every op's host side: the C types of the input dtypes, null pointers, the
device's properties, kernels configured for their dynamic shared memory, and launches (through CuPy, or through the
driver for those that start beside the kernel before them: :class:`ProgrammaticLaunch`).

Arguments of a launch are CuPy arrays (passed as their device pointer) and NumPy scalars of fixed size, structured
ones included (passed by value, like the C struct they mirror); :data:`NULL` stands for an absent array.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from .._arrays import BFLOAT16
from .loader import get_kernel

# The C type of each input dtype, as the kernels' template arguments name it.
CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float16): "__half", BFLOAT16: "__nv_bfloat16"}
# The 16-bit tensor-core operand type of each input C type: bf16 for float32 inputs (split into hi + lo tiles), the
# input's own type otherwise.
MMA_TYPE = {"float": "__nv_bfloat16", "__half": "__half", "__nv_bfloat16": "__nv_bfloat16"}
NULL = np.uint64(0)  # a null pointer argument
_STATIC_SHARED_LIMIT = 48 * 1024  # dynamic shared memory above this needs the kernel's attribute raised


def ptr(x: Any) -> Any:
    """An optional array argument: the array, or :data:`NULL` for None."""
    return NULL if x is None else x


def cpp_bool(x: bool) -> str:
    """A bool template argument."""
    return "true" if x else "false"


@functools.cache
def _device_props_on(device: int) -> dict[str, Any]:
    import cupy

    return cupy.cuda.runtime.getDeviceProperties(device)


def device_props(device: int | None = None) -> dict[str, Any]:
    """``cudaGetDeviceProperties`` of `device` (default: the current one), read once per device."""
    if device is None:
        import cupy

        device = cupy.cuda.runtime.getDevice()
    return _device_props_on(device)


def sm_count(device: int | None = None) -> int:
    """Streaming multiprocessors of `device` (default: the current one)."""
    return int(device_props(device)["multiProcessorCount"])


def configured(source: str, name: str, smem: int) -> Any:
    """The ``cupy.RawKernel`` of a registered instantiation, allowed `smem` bytes of dynamic shared memory."""
    kern = get_kernel(source, name)
    if smem > _STATIC_SHARED_LIMIT and kern.max_dynamic_shared_size_bytes < smem:
        kern.max_dynamic_shared_size_bytes = smem
        # all of the SM's unified L1/shared memory as shared memory, so that two blocks fit where they can
        kern.preferred_shared_memory_carveout = 100
    return kern


def launch(source: str, name: str, grid: int, block: int, smem: int, args: tuple[Any, ...],
           programmatic: bool = False) -> None:
    """Launch `grid` blocks of `block` threads on the current stream (none when grid is 0); ``programmatic``: the
    kernel may start beside the stream's previous one (:class:`ProgrammaticLaunch`)."""
    prepared_launch(source, name, grid, block, smem, args, programmatic)()


def prepared_launch(source: str, name: str, grid: int, block: int, smem: int, args: tuple[Any, ...],
                    programmatic: bool = False) -> Callable[[], None]:
    """:func:`launch`'s launch, to be called later: a programmatic one has its arguments packed now. Every launch
    goes through here."""
    if grid <= 0:
        return lambda: None
    kern = configured(source, name, smem)
    if programmatic:
        return ProgrammaticLaunch(kern, grid, block, smem, args)
    return functools.partial(kern, (grid,), (block,), args, shared_mem=smem)


@functools.cache
def _scalar_codes() -> dict[type, str]:
    return {np.int32: "i", np.uint32: "I", np.int64: "q", np.uint64: "Q", np.float32: "f", np.float64: "d"}


@functools.lru_cache(maxsize=256)
def _param_layout(codes: tuple[str, ...]) -> tuple[Any, tuple[int, ...]]:
    """A ``struct.Struct`` that packs kernel arguments of these ``struct`` codes back to back, and each one's
    offset in it."""
    import struct

    offsets = tuple(struct.calcsize("=" + "".join(codes[:i])) for i in range(len(codes)))
    return struct.Struct("=" + "".join(codes)), offsets


def pack_kernel_params(args: tuple[Any, ...]) -> tuple[Any, Any]:
    """Kernel arguments (CuPy arrays as their device pointers, NumPy scalars of fixed size, structured ones
    included) packed back to back into one host buffer, and the ``void *kernelParams[]`` array pointing at each:
    (buffer, pointers), both to be kept alive until the launch has returned."""
    import array
    import ctypes
    import sys

    cupy = sys.modules.get("cupy")  # an argument can be a CuPy array only where CuPy is imported
    scalar_codes = _scalar_codes()
    codes, values = [], []
    for a in args:
        code = scalar_codes.get(type(a))
        if code is not None:
            values.append(a)
        elif cupy is not None and isinstance(a, cupy.ndarray):
            code = "Q"
            values.append(a.data.ptr)
        elif isinstance(a, np.void):
            code = f"{a.nbytes}s"
            values.append(a.tobytes())
        else:
            raise TypeError(f"kernel arguments are CuPy arrays or NumPy scalars of fixed size, got {type(a).__name__}")
        codes.append(code)
    layout, offsets = _param_layout(tuple(codes))
    buf = ctypes.create_string_buffer(layout.pack(*values), layout.size)
    base = ctypes.addressof(buf)
    return buf, array.array("Q", [base + o for o in offsets])


class ProgrammaticLaunch:
    """A launch of ``kernel`` (a ``cupy.RawKernel``) with programmatic stream serialization, its arguments packed
    and its configuration built ahead; calling it launches on the current stream. The kernel may start once every
    block of the stream's previous kernel has run ``griddepcontrol.launch_dependents`` (or exited), not only once
    that kernel has finished; the two then synchronise through memory themselves. Where the device or a graph
    capture does not support it the launch is an ordinary, serialised one.

    ``args`` as for a CuPy launch: CuPy arrays (passed as their device pointer) and NumPy scalars of fixed size,
    structured ones included (passed by value), packed into one host buffer that the driver copies at the launch.
    Built before the kernel it is to start beside is launched, the launch follows that one within a few
    microseconds of host time (packing and building take tens of microseconds in Python): while the host is
    behind the GPU, the kernel before it runs alone until it comes."""

    def __init__(self, kernel: Any, grid: int, block: int, shared_mem: int, args: tuple[Any, ...]) -> None:
        from cuda.bindings import driver

        self._name = kernel.name
        self._args = args  # the arrays whose pointers are packed stay allocated until the launch, as in a CuPy one
        self._buf, self._pointers = pack_kernel_params(args)  # kept alive until the driver has copied the arguments
        self.params = self._pointers.buffer_info()[0]  # the void *kernelParams[] array's address
        self._function = driver.CUfunction(kernel.kernel.ptr)
        attr = driver.CUlaunchAttribute()
        attr.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        attr.value.programmaticStreamSerializationAllowed = 1
        config = driver.CUlaunchConfig()
        config.gridDimX, config.gridDimY, config.gridDimZ = grid, 1, 1
        config.blockDimX, config.blockDimY, config.blockDimZ = block, 1, 1
        config.sharedMemBytes = shared_mem
        config.attrs = [attr]
        config.numAttrs = 1
        self.config = config  # the driver's launch configuration, but for the stream

    def __call__(self) -> None:
        import cupy
        from cuda.bindings import driver

        self.config.hStream = driver.CUstream(cupy.cuda.get_current_stream().ptr)
        (err,) = driver.cuLaunchKernelEx(self.config, self._function, self.params, 0)
        if err != driver.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"cuLaunchKernelEx failed ({err.name}) for {self._name}")

"""The only place that builds ``cupy.RawModule`` objects.

* Kernel sources are ``.cu`` files under ``rawdelta/cuda/``; headers under ``include/`` and
  ``common/`` are found through ``-I rawdelta/cuda``.
* Template instantiations are listed as NVRTC ``name_expressions`` when a source is registered
  (:func:`register`); the registry is the set of every instantiation the package can launch.
* Compile options live in :func:`compile_options` (sm_90a on compute capability 9.0 devices, for the
  wgmma kernels); ``RAWDELTA_JIT_LINEINFO=1`` adds ``-lineinfo``
  for ncu, ``RAWDELTA_JIT_DEBUG=1`` adds ``-G``.
* Modules are cached per device; CuPy's own disk cache (``CUPY_CACHE_DIR``) keeps the binaries.
  A hash of every header is put in the source text, so editing a header invalidates that cache.
* Compile failures raise :class:`rawdelta.errors.KernelCompileError` with the NVRTC log.
* :func:`compile_all_to_cubin` compiles every registered instantiation to sm_80/sm_90/sm_90a cubins on a
  machine without a GPU or driver (NVRTC through ``cuda.core``); CI uses it.
* Kernels launch through CuPy, except those that start beside the kernel before them
  (:class:`ProgrammaticLaunch`: ``cuLaunchKernelEx`` through ``cuda-bindings``, the ``cuda`` extra).
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import KernelCompileError

CUDA_DIR = Path(__file__).resolve().parent
_lock = threading.Lock()


@dataclass(frozen=True)
class KernelSpec:
    """One CUDA source file and the template instantiations of it that rawdelta launches."""

    source: str  # path relative to rawdelta/cuda, e.g. "gated_delta_rule/recurrent.cu"
    name_expressions: tuple[str, ...] = field(default=())
    defines: tuple[tuple[str, str], ...] = field(default=())


_REGISTRY: dict[tuple[str, tuple[tuple[str, str], ...]], set[str]] = {}


def register(
    source: str, name_expressions: list[str] | tuple[str, ...], defines: dict[str, Any] | None = None
) -> KernelSpec:
    """Declare instantiations of `source` that the package may launch; returns the spec."""
    if not (CUDA_DIR / source).is_file():
        raise FileNotFoundError(f"CUDA source {source!r} not found under {CUDA_DIR}")
    key = (source, tuple(sorted((str(k), str(v)) for k, v in (defines or {}).items())))
    with _lock:
        _REGISTRY.setdefault(key, set()).update(name_expressions)
    return KernelSpec(source, tuple(sorted(_REGISTRY[key])), key[1])


def registered() -> list[KernelSpec]:
    """Every registered (source, defines) with all its instantiations."""
    _import_kernel_users()
    with _lock:
        return [KernelSpec(s, tuple(sorted(n)), d) for (s, d), n in sorted(_REGISTRY.items())]


def _import_kernel_users() -> None:
    # Registration happens when the op modules are imported; import them all.
    import importlib
    import pkgutil

    from .. import ops

    for mod in pkgutil.walk_packages(ops.__path__, ops.__name__ + "."):
        importlib.import_module(mod.name)


@functools.cache
def _headers_hash() -> str:
    h = hashlib.sha256()
    for p in sorted(CUDA_DIR.rglob("*.cuh")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _source_text(spec: KernelSpec) -> str:
    defs = "".join(f"#define {k} {v}\n" for k, v in spec.defines)
    body = (CUDA_DIR / spec.source).read_text()
    return f"// rawdelta headers {_headers_hash()}\n{defs}{body}"


@functools.cache
def _compute_capability(device: int) -> str:
    import cupy

    return str(cupy.cuda.Device(device).compute_capability)


def wgmma_available() -> bool:
    """Whether the current device runs Hopper warpgroup products (compute capability 9.0; modules for it are
    built for sm_90a, so kernels guarded by ``RAWDELTA_WGMMA`` in ``common/wgmma.cuh`` get their wgmma code)."""
    import cupy

    return _compute_capability(cupy.cuda.runtime.getDevice()) == "90"


def compile_options(device: int | None = None) -> tuple[str, ...]:
    """NVRTC options; with a device of compute capability 9.0, ``-arch=sm_90a`` (the wgmma instructions are
    sm_90a-only; NVRTC keeps it over the ``-arch=sm_90`` that CuPy appends)."""
    opts = ["-std=c++17", f"-I{CUDA_DIR}"]
    if device is not None and _compute_capability(device) == "90":
        opts.append("-arch=sm_90a")
    if os.environ.get("RAWDELTA_JIT_LINEINFO") == "1":
        opts.append("-lineinfo")
    if os.environ.get("RAWDELTA_JIT_DEBUG") == "1":
        opts.append("-G")
    return tuple(opts)


_modules: dict[tuple[int, KernelSpec], Any] = {}


def _module(spec: KernelSpec, device: int) -> Any:
    # One module per instantiation: a call compiles only what it launches (fast first result).
    key = (device, spec)
    mod = _modules.get(key)
    if mod is None:
        import cupy

        mod = cupy.RawModule(code=_source_text(spec), options=compile_options(device),
                             name_expressions=spec.name_expressions)
        _modules[key] = mod
    return mod


_kernels: dict[tuple[str, str, tuple[tuple[str, str], ...], int], Any] = {}


def get_kernel(source: str, name_expression: str, defines: dict[str, Any] | None = None) -> Any:
    """The ``cupy.RawKernel`` for one registered instantiation on the current device (compiled once)."""
    import cupy

    dkey = tuple(sorted((str(k), str(v)) for k, v in defines.items())) if defines else ()
    device = cupy.cuda.runtime.getDevice()
    fast = _kernels.get((source, name_expression, dkey, device))
    if fast is not None:  # the hot path of every launch: one dict lookup
        return fast
    key = (source, dkey)
    with _lock:
        names = _REGISTRY.get(key)
        if names is None or name_expression not in names:
            raise KeyError(f"{name_expression!r} of {source!r} is not registered with rawdelta.cuda.loader.register")
        spec = KernelSpec(source, (name_expression,), key[1])
    try:
        kern = _module(spec, device).get_function(name_expression)
        _kernels[(source, name_expression, dkey, device)] = kern
        return kern
    except cupy.cuda.compiler.CompileException as e:
        _modules.pop((device, spec), None)
        raise KernelCompileError(name_expression, e.get_message() if hasattr(e, "get_message") else str(e),
                                 compile_options(device)) from None


@functools.cache
def _scalar_codes() -> dict[type, str]:
    import numpy as np

    return {np.int32: "i", np.uint32: "I", np.int64: "q", np.uint64: "Q", np.float32: "f", np.float64: "d"}


@functools.lru_cache(maxsize=256)
def _param_layout(codes: tuple[str, ...]) -> tuple[Any, tuple[int, ...]]:
    """A ``struct.Struct`` that packs kernel arguments of these ``struct`` codes back to back, and each one's
    offset in it."""
    import struct

    offsets = tuple(struct.calcsize("=" + "".join(codes[:i])) for i in range(len(codes)))
    return struct.Struct("=" + "".join(codes)), offsets


def _kernel_params(args: tuple[Any, ...]) -> tuple[Any, Any]:
    """Kernel arguments (CuPy arrays as their device pointers, NumPy scalars of fixed size, structured ones
    included) packed back to back into one host buffer, and the ``void *kernelParams[]`` array pointing at each:
    (buffer, pointers), both to be kept alive until the launch has returned."""
    import array
    import ctypes
    import sys

    import numpy as np

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
        self._buf, self._pointers = _kernel_params(args)  # kept alive until the driver has copied the arguments
        self._params = self._pointers.buffer_info()[0]
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
        self._config = config

    def __call__(self) -> None:
        import cupy
        from cuda.bindings import driver

        self._config.hStream = driver.CUstream(cupy.cuda.get_current_stream().ptr)
        (err,) = driver.cuLaunchKernelEx(self._config, self._function, self._params, 0)
        if err != driver.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"cuLaunchKernelEx failed ({err.name}) for {self._name}")


def precompile() -> int:
    """Compile every registered instantiation for the current device; returns how many."""
    n = 0
    for spec in registered():
        for name in spec.name_expressions:
            get_kernel(spec.source, name, dict(spec.defines))
            n += 1
    return n


def _cuda_include_dirs() -> list[str]:
    """CUDA headers (cuda_bf16.h, cuda_fp16.h) from the pip-installed toolkit, for driverless compiles."""
    dirs: list[str] = []
    try:
        import cuda.pathfinder as pf

        for lib in ("cudart", "cccl"):
            try:
                d = pf.find_nvidia_header_directory(lib)
            except Exception:
                d = None
            if d:
                dirs.append(str(d))
    except ImportError:
        pass
    for env in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(env):
            dirs.append(os.path.join(os.environ[env], "include"))
    return dirs


def compile_all_to_cubin(archs: tuple[str, ...] = ("sm_80", "sm_90", "sm_90a")) -> dict[tuple[str, str], int]:
    """Compile every registered instantiation to cubin for each arch, without a GPU or driver.

    Uses NVRTC through ``cuda.core``. Returns ``{(source, arch): cubin_bytes}``; raises
    :class:`KernelCompileError` with the log on the first failure.
    """
    from cuda.core import Program, ProgramOptions

    results: dict[tuple[str, str], int] = {}
    includes = [str(CUDA_DIR), *_cuda_include_dirs()]
    for spec in registered():
        for arch in archs:
            opts = ProgramOptions(arch=arch, std="c++17", include_path=includes)
            prog = Program(_source_text(spec), "c++", options=opts)
            try:
                obj = prog.compile("cubin", name_expressions=spec.name_expressions)
            except Exception as e:  # cuda.core raises its own error type carrying the log
                raise KernelCompileError(f"{spec.source} [{arch}]", str(e), (arch,)) from None
            finally:
                prog.close()
            results[(spec.source, arch)] = len(obj.code)
    return results

"""The only place that builds ``cupy.RawModule`` objects.

* Kernel sources are ``.cu`` files under ``rawdelta/cuda/``; headers under ``include/`` and
  ``common/`` are found through ``-I rawdelta/cuda``.
* Template instantiations are listed as NVRTC ``name_expressions`` when a source is registered
  (:func:`register`), by the op modules that launch them when they are imported; :func:`registered` lists what has
  been registered (``rawdelta.ops.registry.import_kernel_modules()`` imports every op's, for callers that need them
  all).
* Compile options live in :func:`compile_options` (sm_90a on compute capability 9.0 devices, for the
  wgmma kernels); ``RAWDELTA_JIT_LINEINFO=1`` adds ``-lineinfo``
  for ncu, ``RAWDELTA_JIT_DEBUG=1`` adds ``-G``.
* Modules are cached per device; CuPy's own disk cache (``CUPY_CACHE_DIR``) keeps the binaries.
  A hash of every header is put in the source text, so editing a header invalidates that cache.
* Compile failures raise :class:`rawdelta.errors.KernelCompileError` with the NVRTC log.
* :func:`compile_all_to_cubin` compiles every registered instantiation to cubins on a machine without a GPU or
  driver (NVRTC through ``cuda.core``), in parallel processes; CI uses it. Each instantiation is compiled for the
  targets it runs on (its registration's ``targets``): by default sm_80 and sm_90, which stand for every device
  the package supports (the runtime builds for the device's own architecture); the instantiations that run only on
  compute capability 9.0 (the Hopper kernels: wgmma, TMA, programmatic launches) are registered with
  ``targets=HOPPER_TARGETS`` and compiled for sm_90a only, the target the runtime builds every module for on such
  a device. There the other instantiations compile to the code they have for sm_90: what only sm_90a has is behind
  ``RAWDELTA_WGMMA`` (``common/wgmma.cuh``), which only the Hopper kernels reach.
* Launching (dynamic shared memory, programmatic launches, null pointers, C types, device properties) is
  :mod:`rawdelta.cuda.launch`.
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
_NAMES_PER_JOB = 16  # instantiations per compile job of compile_all_to_cubin (see there)
DEFAULT_TARGETS = ("sm_80", "sm_90")  # where an instantiation is compiled unless registered otherwise
HOPPER_TARGETS = ("sm_90a",)  # instantiations launched only on compute capability 9.0
ALL_TARGETS = ("sm_80", "sm_90", "sm_90a")
_lock = threading.Lock()

Defines = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class KernelSpec:
    """One CUDA source file and the template instantiations of it that rawdelta launches, with the compile targets
    they run on."""

    source: str  # path relative to rawdelta/cuda, e.g. "gated_delta_rule/recurrent.cu"
    name_expressions: tuple[str, ...] = field(default=())
    defines: Defines = field(default=())
    targets: tuple[str, ...] = DEFAULT_TARGETS


# (source, defines) -> {name expression: its compile targets}
_REGISTRY: dict[tuple[str, Defines], dict[str, tuple[str, ...]]] = {}


def _defines_key(defines: dict[str, Any] | None) -> Defines:
    return tuple(sorted((str(k), str(v)) for k, v in (defines or {}).items()))


def register(source: str, name_expressions: list[str] | tuple[str, ...], defines: dict[str, Any] | None = None,
             targets: tuple[str, ...] = DEFAULT_TARGETS) -> KernelSpec:
    """Declare instantiations of `source` that the package may launch, and the compile targets they run on
    (:data:`HOPPER_TARGETS` for those launched only on compute capability 9.0); returns their spec."""
    if not (CUDA_DIR / source).is_file():
        raise FileNotFoundError(f"CUDA source {source!r} not found under {CUDA_DIR}")
    key = (source, _defines_key(defines))
    with _lock:
        names = _REGISTRY.setdefault(key, {})
        for name in name_expressions:
            names[name] = targets
    return KernelSpec(source, tuple(sorted(name_expressions)), key[1], targets)


def registered() -> list[KernelSpec]:
    """Every registered (source, defines, targets) with all its instantiations: what the imported op modules have
    registered (``rawdelta.ops.registry.import_kernel_modules()`` imports them all)."""
    with _lock:
        groups: dict[tuple[str, Defines, tuple[str, ...]], list[str]] = {}
        for (source, defines), names in _REGISTRY.items():
            for name, targets in names.items():
                groups.setdefault((source, defines, targets), []).append(name)
    return [KernelSpec(s, tuple(sorted(n)), d, t) for (s, d, t), n in sorted(groups.items())]


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
        spec = KernelSpec(source, (name_expression,), key[1], names[name_expression])
    try:
        kern = _module(spec, device).get_function(name_expression)
        _kernels[(source, name_expression, dkey, device)] = kern
        return kern
    except cupy.cuda.compiler.CompileException as e:
        _modules.pop((device, spec), None)
        raise KernelCompileError(name_expression, e.get_message() if hasattr(e, "get_message") else str(e),
                                 compile_options(device)) from None


def precompile() -> int:
    """Compile every registered instantiation for the current device (those of every op once
    ``rawdelta.ops.registry.import_kernel_modules()`` has run), except those for other devices (registered with
    ``targets=HOPPER_TARGETS``, off compute capability 9.0); returns how many."""
    import cupy

    hopper = _compute_capability(cupy.cuda.runtime.getDevice()) == "90"
    n = 0
    for spec in registered():
        if spec.targets == HOPPER_TARGETS and not hopper:
            continue
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


def _compile_cubin(text: str, names: tuple[str, ...], arch: str, fast: bool = False) -> tuple[int, str | None]:
    """One NVRTC compile to cubin (a job of :func:`compile_all_to_cubin`, run in a worker process): the cubin's
    bytes, or 0 and the compiler's log. ``fast``: ``-Ofast-compile=max``."""
    from cuda.core import Program, ProgramOptions

    opts = ProgramOptions(arch=arch, std="c++17", include_path=[str(CUDA_DIR), *_cuda_include_dirs()],
                          ofast_compile="max" if fast else None)
    prog = Program(text, "c++", options=opts)
    try:
        return len(prog.compile("cubin", name_expressions=names).code), None
    except Exception as e:  # cuda.core raises its own error type carrying the log
        return 0, str(e)
    finally:
        prog.close()


def compile_all_to_cubin(archs: tuple[str, ...] = ALL_TARGETS, workers: int | None = None,
                         names_per_job: int = _NAMES_PER_JOB, sources: tuple[str, ...] | None = None,
                         fast: bool = False) -> dict[tuple[str, str], int]:
    """Compile every registered instantiation (of `sources` only, where given) to cubin for each of `archs` among
    its targets (the module docstring has the rule), without a GPU or driver, in `workers` processes (default: one
    per CPU).

    Uses NVRTC through ``cuda.core``; each job compiles up to `names_per_job` instantiations of one source for one
    arch (the workers are spawned processes: a script that calls this runs it under ``if __name__ ==
    "__main__":``). Returns ``{(source, arch): cubin bytes}`` summed over a source's jobs;
    raises :class:`KernelCompileError` with the log of the first job (in registration order) that failed.

    ``fast``: compile with ``-Ofast-compile=max``, the device optimisations cut for compile time (about a fifth of
    it). What makes a kernel fail to build does not depend on them: the C++ front end, the template instantiations,
    the static assertions, and the inline PTX assembled and register-allocated for the target. So a check that only
    asks whether every instantiation builds can take it. The code the runtime runs is built with full optimisation
    (:func:`compile_options`)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    jobs = []
    for spec in registered():
        if sources is not None and spec.source not in sources:
            continue
        text = _source_text(spec)
        for arch in archs:
            if arch in spec.targets:
                for i in range(0, len(spec.name_expressions), names_per_job):
                    jobs.append((spec.source, arch, text, spec.name_expressions[i:i + names_per_job]))
    # the largest jobs first, so that no long one starts last
    order = sorted(range(len(jobs)), key=lambda j: -len(jobs[j][3]))
    # spawned, not forked: a fork of a process with threads (JAX's, CuPy's) can deadlock in the child
    with ProcessPoolExecutor(max_workers=max(1, min(workers or os.cpu_count() or 1, len(jobs))),
                             mp_context=multiprocessing.get_context("spawn")) as ex:
        futures = {j: ex.submit(_compile_cubin, jobs[j][2], jobs[j][3], jobs[j][1], fast) for j in order}
        done = {j: f.result() for j, f in futures.items()}
    results: dict[tuple[str, str], int] = {}
    for j, (source, arch, _, names) in enumerate(jobs):
        nbytes, log = done[j]
        if log is not None:
            raise KernelCompileError(f"{source} [{arch}] ({len(names)} instantiations)", log, (arch,))
        results[(source, arch)] = results.get((source, arch), 0) + nbytes
    return results

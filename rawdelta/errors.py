"""The exception classes rawdelta raises (api.md section 6)."""

from __future__ import annotations


class RawDeltaError(Exception):
    """Base class of every rawdelta-specific exception."""


class UnsupportedConfigError(RawDeltaError, NotImplementedError):
    """A valid combination of arguments that a backend does not support (names backend and limit)."""


class BackendUnavailableError(RawDeltaError, RuntimeError):
    """The requested backend cannot run here (no GPU, CuPy or Numba missing)."""


class KernelCompileError(RawDeltaError, RuntimeError):
    """NVRTC rejected a kernel: carries the kernel name and the compiler log."""

    def __init__(self, kernel: str, log: str, options: tuple[str, ...] = ()):
        self.kernel = kernel
        self.log = log
        self.options = tuple(options)
        super().__init__(f"failed to compile CUDA kernel {kernel!r} with options {list(self.options)}:\n{log}")

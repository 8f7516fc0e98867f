"""Where the benchmark runs: GPU or CPU, the device's name and the versions of everything that is timed."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
from dataclasses import dataclass
from typing import Any

from .._arrays import cupy_or_none
from ..ops.common.backend import gpu_unavailable_reason

# Distributions whose versions go into every result (the peer is fla-core, Triton its compiler).
DISTRIBUTIONS = ("numpy", "cupy", "numba-cuda", "torch", "triton", "fla-core")


@dataclass(frozen=True)
class Env:
    """The machine a run measures.

    Attributes:
        kind: ``"gpu"`` when CuPy sees a CUDA GPU, else ``"cpu"``.
        gpu_reason: why there is no GPU (None on a GPU).
        torch_cuda: torch is importable and sees the same GPU; the GPU harness (events, peak memory,
            torch-based implementations) then runs on torch's current stream.
    """

    kind: str
    gpu_reason: str | None
    torch_cuda: bool

    @property
    def gpu(self) -> bool:
        return self.kind == "gpu"


def _torch_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def detect(force_cpu: bool = False) -> Env:
    """The current machine; ``force_cpu`` measures the CPU path even where a GPU exists."""
    reason = "--cpu was given" if force_cpu else gpu_unavailable_reason()
    if reason is not None:
        return Env("cpu", reason, False)
    return Env("gpu", None, _torch_cuda())


def version(dist: str) -> str | None:
    """Installed version of a distribution (any ``cupy-cuda*`` wheel for ``cupy``), None when absent."""
    names = [dist]
    if dist == "cupy":
        names = importlib.metadata.packages_distributions().get("cupy", []) or names
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def versions() -> dict[str, str | None]:
    """``{"rawdelta": ..., "python": ..., <distribution>: version or None}``."""
    from .. import __version__

    out: dict[str, str | None] = {"rawdelta": __version__, "python": platform.python_version()}
    out.update({d: version(d) for d in DISTRIBUTIONS})
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe(env: Env) -> dict[str, Any]:
    """Name and static properties of the device that is timed."""
    if not env.gpu:
        return {"kind": "cpu", "name": _cpu_name(), "cores": os.cpu_count(), "gpu_reason": env.gpu_reason}
    cp = cupy_or_none()
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return {"kind": "gpu", "name": name, "compute_capability": f"{props['major']}.{props['minor']}",
            "memory_bytes": int(props["totalGlobalMem"]), "l2_bytes": int(props.get("l2CacheSize", 0)),
            "sms": int(props["multiProcessorCount"]), "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
            "cuda_driver": cp.cuda.runtime.driverGetVersion()}

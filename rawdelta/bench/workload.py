"""One benchmark problem: the inputs of an op at a shape, on the host and wherever the implementations read them.

Inputs come from the op's generator in :mod:`rawdelta.testing.inputs` (the tests' own) with a fixed seed,
so the float64 reference can regenerate them bit for bit in another process. The cotangent ``do`` is
rounded to the input dtype, because torch autograd takes it in the dtype of ``o``; every implementation
and the reference see the same rounded values.

On a GPU the arrays are placed once as torch tensors when torch sees the GPU (the peer and SDPA read them)
and handed to rawdelta as zero-copy CuPy views (DLPack), so every implementation reads the same memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .._arrays import BFLOAT16
from .env import Env
from .modes import DECODE, Shape

if TYPE_CHECKING:
    from .registry import OpSpec


def np_dtype(name: str) -> np.dtype:
    """NumPy dtype of a ``--dtype`` name (``bfloat16`` through ml_dtypes)."""
    return BFLOAT16 if name in ("bfloat16", "bf16") else np.dtype(name)


def host_inputs(op: OpSpec, shape: Shape, mode: str, dtype: str, seed: int) -> dict[str, Any]:
    """The generator's dict for `op` at `shape` ``(B, T, H, D)``: q, k ``[B, T, H, D]``, v ``[B, T, H, D]``,
    g, beta ``[B, T, H]``, ``initial_state`` ``[B, H, D, D]`` in decode only, flags, and ``do``
    ``[B, T, H, D]`` rounded to `dtype` (``dht`` is dropped: no mode differentiates the final state)."""
    B, T, H, D = shape
    x = op.inputs(B, T, H, D, D, dtype=dtype, seed=seed, initial_state=mode == DECODE, **op.input_args)
    x.pop("dht", None)
    x["do"] = x["do"].astype(np_dtype(dtype))
    return x


@dataclass(frozen=True)
class GateSlice:
    """The part of every output the correctness gate compares: batch rows, heads and (optionally) tokens.

    Token arrays ``[B, T, H, ...]`` are cut to ``[batch, :, heads]`` on the device, then to ``rows`` on the
    host; states ``[N, H, K, V]`` to ``[batch, heads]``. Strided slices keep the cut a view of any dtype.
    """

    batch: slice
    heads: slice
    rows: tuple[int, ...] | None = None

    @classmethod
    def corners(cls, shape: Shape, rows: tuple[int, ...] | None = None) -> GateSlice:
        """First and last batch row x first and last head: where offset arithmetic goes wrong first."""
        B, _, H, _ = shape
        return cls(slice(0, B, max(B - 1, 1)), slice(0, H, max(H - 1, 1)), rows)

    def index(self, name: str) -> tuple[slice, ...]:
        if name in ("final_state", "initial_state"):
            return self.batch, self.heads
        return self.batch, slice(None), self.heads

    def host(self, name: str, x: Any) -> np.ndarray:
        """``x[index]`` as a float64 host array (rows applied last)."""
        y = _host64(x, self.index(name))
        if self.rows is not None and name not in ("final_state", "initial_state"):
            y = y[:, list(self.rows)]
        return y

    def cut_inputs(self, x: dict[str, Any]) -> dict[str, Any]:
        """The host inputs restricted to the slice (rows are not cut: the references need every token)."""
        return {n: (a[self.index(n)] if isinstance(a, np.ndarray) and a.ndim >= 3 else a) for n, a in x.items()}


def _host64(x: Any, index: tuple[slice, ...]) -> np.ndarray:
    """``x[index]`` of a numpy, torch or CuPy array as a float64 host array."""
    if isinstance(x, np.ndarray):
        return np.asarray(x[index], dtype=np.float64)
    if type(x).__module__.startswith("torch"):
        return x[index].detach().float().cpu().numpy().astype(np.float64)
    # CuPy: move the raw bits (any dtype, bfloat16 included) and reinterpret them on the host.
    dt = np.dtype(x.dtype)
    bits = x.view(f"u{dt.itemsize}")[index].get()
    return bits.view(dt).astype(np.float64)


def _torch_tensor(a: np.ndarray, device: str) -> Any:
    import torch

    if a.dtype == BFLOAT16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).to(device)
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


class Workload:
    """Inputs of one (op, shape, mode): host numpy arrays, plus torch and CuPy copies made on first use.

    Args:
        host: :func:`host_inputs`' dict.
        env: the machine; on a GPU, torch tensors live on it and CuPy arrays are views of them.
    """

    def __init__(self, host: dict[str, Any], env: Env) -> None:
        self.host = host
        self.env = env
        self._torch: dict[str, Any] | None = None
        self._cupy: dict[str, Any] | None = None

    def arrays(self, kind: str) -> dict[str, Any]:
        """The inputs as ``"numpy"``, ``"torch"`` (on the GPU when there is one) or ``"cupy"`` arrays."""
        if kind == "numpy":
            return self.host
        if kind == "torch":
            if self._torch is None:
                device = "cuda" if self.env.gpu else "cpu"
                self._torch = {n: _torch_tensor(a, device) if isinstance(a, np.ndarray) else a
                               for n, a in self.host.items()}
            return self._torch
        if kind == "cupy":
            if not self.env.gpu:
                raise RuntimeError("CuPy arrays need a GPU")
            if self._cupy is None:
                import cupy

                if self.env.torch_cuda:
                    self._cupy = {n: cupy.from_dlpack(a) if hasattr(a, "__dlpack__") else a
                                  for n, a in self.arrays("torch").items()}
                else:
                    self._cupy = {n: cupy.asarray(a) if isinstance(a, np.ndarray) else a
                                  for n, a in self.host.items()}
            return self._cupy
        raise ValueError(f"unknown array kind {kind!r}")

    def stream(self) -> Any:
        """The stream rawdelta launches on: torch's current stream when torch runs the GPU harness."""
        if not (self.env.gpu and self.env.torch_cuda):
            return None
        import cupy
        import torch

        handle = torch.cuda.current_stream().cuda_stream
        # 0 is the legacy default stream, which is also CuPy's current stream by default.
        return None if handle == 0 else cupy.cuda.ExternalStream(handle)

    def release(self) -> None:
        """Drop the device copies (the next shape needs the memory)."""
        self._torch = None
        self._cupy = None

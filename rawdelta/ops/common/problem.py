"""A validated call: what every backend of every op consumes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .opdef import OpDef


class Problem:
    """A validated call of one op (:func:`~.validation.validate` makes it). Read-only.

    Attributes (all plain attributes, so backends read them at attribute speed):

    * every array of the op's family by name (``p.q``, ``p.g``, ``p.initial_state`` ...): a C-contiguous NumPy or
      CuPy array (all of one library and device), None when absent or not an argument of this op; float32 arrays
      (gates, beta, states) are float32 (float64 stays float64 on the numpy backend);
    * the bound dimensions (``p.B``, ``p.T``, ``p.H``, ``p.K``, ``p.V``, ``p.HV`` ... and ``p.N``, the number of
      sequences), also as the dict ``p.dims``;
    * every static option of the op (``p.scale`` resolved to a float, the flags, ``p.chunk_size``,
      ``p.output_final_state`` (True also with ``inplace_final_state``), ``p.inplace_final_state``,
      ``p.state_v_first``);
    * ``p.state_layout_native``: with ``state_v_first``, the states (``p.initial_state``, and the final state,
      ``dht`` and dh0 the backend returns and takes) are in the caller's ``[N, HV, V, K]``, because the backend reads
      and writes that layout itself (``NATIVE_STATE_V_FIRST``, :class:`~.opdef.Backend`); False otherwise, where
      states are ``[N, HV, K, V]`` (a transposed copy of the caller's);
    * ``p.cu_seqlens`` (int64, the arrays' library; None without varlen) and its host copy ``p.cu_seqlens_host``;
    * ``p.backend`` (resolved: ``"numpy"``, ``"numba"`` or ``"cuda"``), ``p.stream``, ``p.op`` (the
      :class:`~.opdef.OpDef`) and ``p.input_dtypes`` (the caller's dtype per array, for casting gradients back);
    * ``p.for_backward``: True where a backward of this call follows its forward (``X_fwd``, and the adapters'
      forwards under autograd), so the forward may keep what the backward would recompute. Default False.
    """

    op: OpDef
    backend: str
    stream: Any
    cu_seqlens: Any
    cu_seqlens_host: np.ndarray | None
    input_dtypes: dict[str, Any]
    dims: dict[str, int]
    B: int
    T: int
    N: int
    state_v_first: bool
    state_layout_native: bool
    for_backward: bool = False  # a class default: validate() leaves it unset

    def __init__(self, **attrs: Any) -> None:
        self.__dict__.update(attrs)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"a {type(self).__name__} is read-only (use replace)")

    def replace(self, **changes: Any) -> Problem:
        """A copy with some attributes replaced (the finite-difference tests perturb one input this way)."""
        return type(self)(**{**self.__dict__, **changes})

    def __repr__(self) -> str:
        dims = ", ".join(f"{d}={n}" for d, n in self.dims.items())
        return f"{type(self).__name__}({self.op.name}, {dims}, backend={self.backend!r})"

    @property
    def xp(self) -> Any:
        """numpy or cupy: the arrays' library."""
        if isinstance(self.q, np.ndarray):
            return np
        import cupy

        return cupy

    @property
    def seq_lengths(self) -> np.ndarray:
        """Tokens per sequence ``[N]`` (int64), from the host copy of ``cu_seqlens``."""
        if self.cu_seqlens_host is None:
            return np.full(self.N, self.T, dtype=np.int64)
        return np.diff(self.cu_seqlens_host.astype(np.int64, copy=False))

    def num_chunks(self, chunk: int) -> int:
        """Chunks of `chunk` tokens over every sequence of the call (chunks never cross sequences)."""
        if self.cu_seqlens_host is None:  # every launch's host path asks: integers, not arrays
            return self.N * -(-self.T // chunk)
        return int(np.sum((self.seq_lengths + chunk - 1) // chunk))

    @property
    def seq_bounds(self) -> list[tuple[int, int, int]]:
        """``(batch row, start, end)`` per sequence n, in T coordinates of that row."""
        if self.cu_seqlens_host is None:
            return [(b, 0, self.T) for b in range(self.B)]
        c = self.cu_seqlens_host
        return [(0, int(c[n]), int(c[n + 1])) for n in range(self.N)]

    def arrays(self) -> dict[str, Any]:
        """The op's arrays by name (None where absent)."""
        return {name: self.__dict__[name] for name in self.op.array_names}

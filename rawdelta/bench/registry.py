"""What ``rawdelta bench`` measures, as data: ops x modes x shapes x implementations.

The ops are every registered op with a benchmark declaration (``OpDef.bench``: its modes, the name of its
bytes/FLOPs model in :mod:`.models`, the model's input settings and the peer's function); a new op is benchmarked
by being registered. A new implementation adds one :class:`ImplSpec` row whose builder (in :mod:`.impls`) works for
every op. The runner does not change.

Shapes are ``(B, T, H, D)`` with ``K = V = D`` and ``HV = H``. Decode shapes have ``T = 1`` (B is then the
number of sequences, each with its state in and out); the ``decode`` mode takes the shapes with ``T = 1``
and the other modes the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..ops import registry
from . import impls
from .modes import DECODE, FORWARD, FORWARD_BACKWARD, MODES, Shape

__all__ = ["CPU_SHAPES", "DECODE", "FORWARD", "FORWARD_BACKWARD", "GPU_SHAPES", "IMPLS", "MODES", "OPS", "ImplSpec",
           "OpSpec", "Shape", "default_shapes", "impl_modes", "parse_shapes", "shape_fits_mode"]

# The peer's sweep (fla's benchmark shapes), then decode: 64 and 256 sequences x 1 token, 32 heads.
GPU_SHAPES: tuple[Shape, ...] = (
    (1, 8192, 96, 128), (2, 16384, 16, 128), (4, 2048, 16, 128), (4, 4096, 64, 128), (8, 2048, 32, 256),
    (8, 1024, 8, 64),
    (64, 1, 32, 128), (256, 1, 32, 128),
)
# Without a GPU the numpy (float64) backend runs; the same sweep, scaled down so it takes about a minute.
CPU_SHAPES: tuple[Shape, ...] = (
    (1, 512, 6, 32), (2, 1024, 1, 32), (4, 128, 2, 32), (4, 256, 4, 32), (8, 128, 2, 64), (8, 64, 1, 16),
    (16, 1, 4, 32), (64, 1, 4, 32),
)


@dataclass(frozen=True)
class OpSpec:
    """One public op.

    Attributes:
        name: ``rawdelta.<name>`` (and ``<name>_fwd`` / ``<name>_bwd``) are what is timed.
        modes: the modes it is benchmarked in.
        inputs: its family's input generator (the tests' own), called as
            ``inputs(B, T, H, D, D, dtype=..., seed=..., initial_state=..., **input_args)``.
        input_args: the model settings (GatedDeltaNet: q/k L2-normalised in the kernel).
        reference: name of its float64 reference (:func:`.reference.reference_for`): the op's own name.
        model: name of the bytes/FLOPs model in :data:`.models.MODELS`.
        peer: ``"module:function"`` of the peer's equivalent, or None.
        yardstick: softmax attention (torch SDPA) is timed beside it in forward and forward + backward.
    """

    name: str
    modes: tuple[str, ...]
    inputs: Callable[..., dict[str, Any]]
    input_args: dict[str, Any]
    reference: str
    model: str
    peer: str | None = None
    yardstick: bool = True


@dataclass(frozen=True)
class ImplSpec:
    """One implementation, able to run any op it applies to.

    Attributes:
        name: the ``--impl`` name.
        label: how tables and plots name it.
        family: ``"rawdelta"``, ``"peer"`` or ``"yardstick"``.
        arrays: what it reads: ``"numpy"``, ``"cupy"`` or ``"torch"`` (on the CPU only NumPy's allocations are
            traced, so peak memory is reported for ``"numpy"`` there).
        build: ``build(op, mode, workload) -> fn``; ``fn()`` runs one call and returns its outputs by name
            (``o``, ``final_state``, ``dq``, ``dk``, ``dv``, ``dg``, ``dbeta``).
        availability: ``availability(env) -> None`` or why it cannot run here.
        default_on: device kinds (``"gpu"``, ``"cpu"``) where it runs without ``--impl``.
        applies: whether it has a version of an op (the peer needs ``op.peer``, SDPA ``op.yardstick``).
        modes: the modes it runs in (None: all of the op's).
        reference: float64 reference used for its correctness gate instead of the op's (None: the op's).
        model: bytes/FLOPs model used for its floor instead of the op's.
        shared: its result does not depend on the op (measured once per shape and mode, shown under each op).
        cold_start: time to first result is measured in a fresh process.
        compiles_per_shape: its first call at a new shape may compile or autotune (NVRTC instantiations per head
            dimension, Triton autotuning per shape); when False (Numba, NumPy) a first call after one at another
            shape is taken as warm, so a slow one is reported at once instead of being repeated.
    """

    name: str
    label: str
    family: str
    arrays: str
    build: Callable[[OpSpec, str, Any], Callable[[], dict[str, Any]]]
    availability: Callable[[Any], str | None]
    default_on: frozenset[str]
    applies: Callable[[OpSpec], bool] = lambda op: True
    modes: tuple[str, ...] | None = None
    reference: str | None = None
    model: str | None = None
    shared: bool = False
    cold_start: bool = False
    compiles_per_shape: bool = True
    notes: dict[str, str] = field(default_factory=dict)


def op_spec(op: Any) -> OpSpec:
    """The benchmark row of a declared op (its ``bench`` declaration)."""
    b = op.bench
    return OpSpec(op.name, tuple(b.modes), op.family.input_generator(), dict(b.input_args), op.name, b.model, b.peer,
                  b.yardstick)


OPS: tuple[OpSpec, ...] = tuple(op_spec(op) for op in registry.ops() if op.bench is not None)

IMPLS: tuple[ImplSpec, ...] = (
    ImplSpec("cuda", "rawdelta cuda", "rawdelta", "cupy", impls.rawdelta("cuda"), impls.needs_gpu,
             frozenset({"gpu"}), cold_start=True),
    ImplSpec("numba", "rawdelta numba", "rawdelta", "cupy", impls.rawdelta("numba"), impls.numba_on_gpu,
             frozenset({"gpu"}), compiles_per_shape=False),
    ImplSpec("numpy", "rawdelta numpy (float64)", "rawdelta", "numpy", impls.rawdelta("numpy"), impls.anywhere,
             frozenset({"cpu"}), cold_start=True, compiles_per_shape=False),
    ImplSpec("fla", "fla-core (peer)", "peer", "torch", impls.peer, impls.fla_on_gpu, frozenset({"gpu"}),
             applies=lambda op: op.peer is not None, cold_start=True),
    ImplSpec("sdpa", "torch SDPA (causal softmax)", "yardstick", "torch", impls.sdpa, impls.torch_here,
             frozenset({"gpu", "cpu"}), applies=lambda op: op.yardstick, modes=(FORWARD, FORWARD_BACKWARD),
             reference="softmax_attention", model="softmax_attention", shared=True,
             notes={"gpu": "flash backend forced", "cpu": "torch's CPU kernel"}),
)


def op_names(ops: Sequence[OpSpec] = OPS) -> tuple[str, ...]:
    return tuple(o.name for o in ops)


def impl_names(impl_specs: Sequence[ImplSpec] = IMPLS) -> tuple[str, ...]:
    return tuple(i.name for i in impl_specs)


def default_shapes(kind: str) -> tuple[Shape, ...]:
    """The sweep for a device kind (``"gpu"`` or ``"cpu"``)."""
    return GPU_SHAPES if kind == "gpu" else CPU_SHAPES


def shape_fits_mode(shape: Shape, mode: str) -> bool:
    """Decode takes the ``T = 1`` shapes; forward and forward + backward the others."""
    return (shape[1] == 1) == (mode == DECODE)


def impl_modes(impl: ImplSpec, op: OpSpec) -> tuple[str, ...]:
    """The modes in which `impl` runs `op`."""
    if not impl.applies(op):
        return ()
    return tuple(m for m in op.modes if impl.modes is None or m in impl.modes)


def parse_shapes(text: str) -> tuple[Shape, ...]:
    """``"8x2048x16x128,64x1x32x128"`` -> shapes; raises ValueError naming the bad entry."""
    shapes = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        parts = item.lower().split("x")
        try:
            dims = tuple(int(p) for p in parts)
        except ValueError:
            dims = ()
        if len(dims) != 4 or min(dims) < 1:
            raise ValueError(f"shape {item!r} is not BxTxHxD with positive integers (e.g. 8x2048x16x128)")
        shapes.append(dims)
    if not shapes:
        raise ValueError("no shape given")
    return tuple(shapes)  # type: ignore[return-value]

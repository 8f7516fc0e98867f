"""The declaration of an op: everything the generic machinery needs to derive its API, adapters, checks and tests.

An op family (``ops/<family>/definition.py``) declares its array arguments (:class:`Array`), its static options
(:class:`Option`), a :class:`Family` (the gradients tuple, the problem class, the validation hook, the input
generator) and one :class:`OpDef` per public op (signature order, outputs, backends, chunk sizes, check cases,
benchmark model). From these, :mod:`.api` builds ``X``, ``X_fwd``, ``X_bwd`` and the reference functions,
:mod:`.validation` checks a call, the adapters build ``rawdelta.torch.X`` and ``rawdelta.jax.X``, ``rawdelta check``
and ``rawdelta bench`` take their rows, and ``tests/contract`` parametrises over every op.

Arguments every op may take (``scale``, ``initial_state``, ``output_final_state``, ``cu_seqlens``,
``cu_seqlens_cpu``, ``chunk_size``, ``inplace_final_state``, ``backend``, ``stream``) are declared once here
(:data:`COMMON`); an op names them in its signature like its own.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .problem import Problem
    from .validation import Check

KEYWORD_ONLY = "*"  # the marker in an OpDef's signature before the keyword-only parameters


@dataclass(frozen=True)
class Array:
    """An array argument.

    Attributes:
        name: the parameter name.
        shape: symbolic shape, e.g. ``("B", "T", "H", "K")``; symbols are bound by the first array that has them.
        doc: what it is (the Args line after the shape), e.g. ``"queries"``.
        required: None is a TypeError (q, k, v); otherwise None means absent.
        differentiable: it has a gradient (a field of the family's gradients tuple).
        float32: read as float32 whatever its floating dtype (gates, beta, states; copied when given in another
            dtype); otherwise it is an input of the compute dtype (q, k, v) and keeps its dtype.
        alt_shape: a second accepted shape (the recurrent GDN's per-value beta ``[B, T, HV, V]``), chosen by rank.
        state: a recurrent state (``initial_state``): float32 whatever the inputs, its gradient dh0 float32.
        gate: a natural-log decay of the state (``g``, ``gk``, ``gv``): ``-inf`` at a token is a hard reset of
            what it decays (the contract tests check that every backend gives the exact reset).
        absent: what None means, for the docs (``"ones"``, ``"zeros"``, ``"no decay"``).
    """

    name: str
    shape: tuple[str, ...]
    doc: str
    required: bool = False
    differentiable: bool = True
    float32: bool = False
    alt_shape: tuple[str, ...] | None = None
    state: bool = False
    gate: bool = False
    absent: str = ""

    def shape_text(self) -> str:
        text = f"``[{', '.join(self.shape)}]``"
        if self.alt_shape is not None:
            text += f" or ``[{', '.join(self.alt_shape)}]``"
        return text


@dataclass(frozen=True)
class Option:
    """A static (non-array) argument.

    Attributes:
        name: the parameter name.
        default: its default value.
        annotation: its type as written in signatures (``"bool"``, ``"float | None"``, ``"int"``, ``"str"``,
            ``"Any"``); ``"bool"``, ``"int"``, ``"float | None"`` and ``"int | None"`` options are static
            arguments of the framework adapters (torch custom-op schema, JAX trace key).
        doc: the Args text after the type.
        adapters: whether the torch and JAX entry points take it (``backend`` and ``stream`` are the core's).
        alias_of: the option this one is an older name of (accepted with a DeprecationWarning; giving both is an
            error); the adapters resolve it before their custom ops, which take the option itself.
    """

    name: str
    default: Any
    annotation: str
    doc: str
    adapters: bool = True
    alias_of: str | None = None


@dataclass(frozen=True)
class Output:
    """One returned array.

    Attributes:
        name: ``"o"`` or ``"final_state"`` (the second is None unless ``output_final_state``).
        shape: symbolic shape, in the symbols of the op's arrays (``N`` is the number of sequences).
        like: the array whose dtype it takes (``"v"``); None: float32 (float64 for float64 inputs).
    """

    name: str
    shape: tuple[str, ...]
    like: str | None


@dataclass(frozen=True)
class Backend:
    """A backend of an op: the module that implements it, imported on first use.

    The module provides ``forward(p, workspace) -> (outputs, saved)``, with ``outputs`` a tuple in the order of
    :attr:`OpDef.outputs` (the final state may be computed even when not asked for) and ``saved`` what its backward
    takes back (or None), and ``backward(p, saved, do, dht) -> {input name: gradient}`` (None for absent inputs;
    ``saved`` may be None, and the backward then recomputes it). ``p.for_backward`` tells the forward that its
    backward follows (it may then keep more). Optionally ``workspace_nbytes(shapes, dtype, options,
    compute_capability) -> int``: the bytes of a buffer the framework adapters allocate before a forward whose
    backward follows, which the forward fills with ``saved``, and ``saved_from_workspace(p, workspace)``, which
    reads it back (None where it holds nothing).

    States are ``[N, HV, K, V]`` in every backend unless the module sets ``NATIVE_STATE_V_FIRST = True``: then, for
    a call with ``state_v_first``, its forward takes ``p.initial_state`` and returns the final state, and its backward
    takes ``dht`` and returns dh0, in the caller's ``[N, HV, V, K]`` (``p.state_layout_native`` says so), and no
    transposed copy is made. Without it, validation hands the backend a transposed copy and transposes the results
    back.
    """

    module: str

    @property
    def native_state_v_first(self) -> bool:
        """The module reads and writes states in the caller's layout (its ``NATIVE_STATE_V_FIRST``)."""
        return bool(getattr(_module(self.module), "NATIVE_STATE_V_FIRST", False))

    def resolve(self, attr: str) -> Callable[..., Any] | None:
        """The module's function `attr` (None for an optional one it does not define)."""
        return getattr(_module(self.module), attr, None)

    def function(self, attr: str) -> Callable[..., Any]:
        """The module's function `attr`, which the protocol requires (``forward``, ``backward``)."""
        fn = self.resolve(attr)
        if fn is None:
            raise NotImplementedError(f"backend module {self.module} has no {attr}() (rawdelta/ops/common/opdef.py, "
                                      "Backend)")
        return fn


@functools.cache
def _module(path: str) -> Any:
    return importlib.import_module(path)


@functools.cache
def _resolve(path: str) -> Callable[..., Any]:
    module, name = path.split(":")
    return getattr(_module(module), name)


@dataclass(frozen=True)
class CheckCase:
    """One problem of ``rawdelta check`` (and of the contract tests' backend comparison).

    Attributes:
        label: short name for the table.
        params: the family generator's arguments (shapes, options, seed), without ``dtype``.
        call: extra keyword arguments of the call (``chunk_size=16``, ``output_final_state=True``).
    """

    label: str
    params: Mapping[str, Any]
    call: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OpCase:
    """A case of the contract tests: generator arguments and call options, and where it runs.

    Attributes:
        label: the test id.
        params: the family generator's arguments (without ``dtype`` and ``seed``).
        call: extra keyword arguments of the call.
        simulator: also run on the Numba backend in the CUDA simulator (CI); keep these few and tiny.
        adapters: also used by the torch and JAX adapter tests (gradcheck: keep it tiny).
    """

    label: str
    params: Mapping[str, Any]
    call: Mapping[str, Any] = field(default_factory=dict)
    simulator: bool = False
    adapters: bool = False


@dataclass(frozen=True)
class BenchSpec:
    """How ``rawdelta bench`` times the op.

    Attributes:
        modes: ``"forward"``, ``"forward+backward"``, ``"decode"`` (the names of :mod:`rawdelta.bench.modes`).
        model: name of its bytes/FLOPs model in :data:`rawdelta.bench.models.MODELS`.
        input_args: generator arguments of the benchmarked model (GatedDeltaNet: q/k L2-normalised in the kernel).
        peer: ``"module:function"`` of the peer's equivalent, or None.
        yardstick: torch SDPA is timed beside it in forward and forward + backward.
    """

    modes: tuple[str, ...]
    model: str
    input_args: Mapping[str, Any] = field(default_factory=dict)
    peer: str | None = None
    yardstick: bool = True


@dataclass(frozen=True, eq=False)
class Family:
    """What the ops of one family share.

    Attributes:
        name: the package under ``rawdelta/ops`` (``"gated_delta_rule"``).
        title: for tables and docs (``"Gated delta rule"``).
        grads_name: the gradients NamedTuple's name (``"GatedDeltaRuleGrads"``); its fields are the family's
            differentiable arrays, in :attr:`arrays` order.
        grads_doc: its docstring (the fields' Attributes are generated).
        arrays: every array argument of the family's ops (an op takes a subset).
        problem: the :class:`~.problem.Problem` subclass of its calls (family-specific derived properties).
        check: ``check(c)``: the family's own validation (``c`` a :class:`~.validation.Check`); run after the
            generic checks, it adds reasons with ``c.error`` / ``c.not_supported``.
        inputs: ``"module:function"`` of the family's input generator (``rawdelta.testing``), called as
            ``inputs(B, T, H, K, V, dtype=..., seed=..., **params)`` and returning the op's keyword arguments plus
            the cotangents ``do`` and ``dht``.
    """

    name: str
    title: str
    grads_name: str
    grads_doc: str
    arrays: tuple[Array, ...]
    problem: type[Problem]
    check: Callable[[Check], None] | None
    inputs: str

    def array(self, name: str) -> Array:
        for a in self.arrays:
            if a.name == name:
                return a
        raise KeyError(f"{self.name} declares no array {name!r}")

    @property
    def grad_fields(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.arrays if a.differentiable)

    def input_generator(self) -> Callable[..., dict[str, Any]]:
        return _resolve(self.inputs)


@dataclass(frozen=True)
class Reference:
    """A public float64 reference function pair (``naive_*``), on host arrays.

    Attributes:
        name: ``naive_recurrent_gated_delta_rule``; ``name + "_bwd"`` is its backward (cotangents ``do`` and
            ``dht`` as keyword arguments).
        signature: its parameter order (the peer's naive function's, which may differ from the op's), with
            :data:`KEYWORD_ONLY`; every name is an array or option of the op.
        doc: its summary line.
    """

    name: str
    signature: tuple[str, ...]
    doc: str


@dataclass(frozen=True, eq=False)
class OpDef:
    """One public op.

    Attributes:
        name: the public name (``chunk_gated_delta_rule``); ``name_fwd`` / ``name_bwd`` are its raw pair.
        family: its :class:`Family`.
        mode: ``"recurrent"``, ``"chunk"`` or ``"parallel"``.
        signature: parameter names in order, :data:`KEYWORD_ONLY` before the keyword-only ones; each is an array
            of the family, an option of :attr:`options` or a :data:`COMMON` argument.
        options: the op's own static options (its family's flags).
        outputs: what it returns; one output is returned alone, two as a tuple.
        summary: the docstring's first line.
        doc: the docstring's body (the math), before the generated Args and Returns.
        backends: ``{"numpy": Backend, "numba": ..., "cuda": ...}``.
        chunk_sizes: the chunk sizes it accepts (with ``chunk_size`` in its signature).
        limits: per backend, the largest supported size of a dimension and why (``{"cuda": {"K": (256, "...")}}``).
        reference: the op whose numpy backend, in float64, the tests and ``rawdelta check`` compare every
            backend with (the chunked GDN's is the recurrent op: the recurrence defines the function).
        reference_args: the names the reference op gives this op's arguments where they differ (``{"g": "gk"}``:
            the chunked GLA's gate is the recurrent op's per-key gate).
        naive: its public float64 reference functions, if any.
        check_cases: the problems of ``rawdelta check``.
        cases: the contract tests' awkward shapes and options.
        bench: how ``rawdelta bench`` times it (None: not benchmarked).
        residuals_doc: what ``residuals`` holds (the docstring of ``X_fwd``'s residuals type).
    """

    name: str
    family: Family
    mode: str
    signature: tuple[str, ...]
    options: tuple[Option, ...]
    outputs: tuple[Output, ...]
    summary: str
    doc: str
    backends: Mapping[str, Backend]
    chunk_sizes: tuple[int, ...] = ()
    limits: Mapping[str, Mapping[str, tuple[int, str]]] = field(default_factory=dict)
    reference: str | None = None
    reference_args: Mapping[str, str] = field(default_factory=dict)
    naive: tuple[Reference, ...] = ()
    check_cases: tuple[CheckCase, ...] = ()
    cases: tuple[OpCase, ...] = ()
    bench: BenchSpec | None = None
    residuals_doc: str = ""

    def __post_init__(self) -> None:
        known = {a.name for a in self.family.arrays} | {o.name for o in self.options} | set(COMMON)
        unknown = [n for n in self.signature if n != KEYWORD_ONLY and n not in known]
        if unknown:
            raise ValueError(f"{self.name}: signature names {unknown} are not arrays, options or common arguments")

    @functools.cached_property
    def params(self) -> tuple[str, ...]:
        """The parameter names in order, without the keyword-only marker."""
        return tuple(n for n in self.signature if n != KEYWORD_ONLY)

    @functools.cached_property
    def arrays(self) -> tuple[Array, ...]:
        """The op's array arguments, in family declaration order (the order shapes are bound in)."""
        names = set(self.params)
        return tuple(a for a in self.family.arrays if a.name in names)

    @functools.cached_property
    def arrays_by_sequence(self) -> frozenset[str]:
        """The arrays with a row per sequence (an ``N`` in their shape): checked once ``cu_seqlens`` binds N."""
        return frozenset(a.name for a in self.arrays if "N" in a.shape + (a.alt_shape or ()))

    @functools.cached_property
    def array_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.arrays)

    @functools.cached_property
    def differentiable(self) -> tuple[str, ...]:
        """The op's differentiable arrays, in the family's gradient-field order."""
        return tuple(a.name for a in self.arrays if a.differentiable)

    def option(self, name: str) -> Option:
        """The op's option `name` (its own, else the common one)."""
        o = self._options.get(name)
        if o is None:
            raise KeyError(f"{self.name} has no option {name!r}")
        return o

    @functools.cached_property
    def _options(self) -> dict[str, Option]:
        return {**COMMON, **{o.name: o for o in self.options}}

    @functools.cached_property
    def static_options(self) -> tuple[Option, ...]:
        """Every non-array parameter, in signature order."""
        out = []
        for n in self.params:
            if n in ("cu_seqlens", "cu_seqlens_cpu") or any(a.name == n for a in self.family.arrays):
                continue
            out.append(self.option(n))
        return tuple(out)

    @functools.cached_property
    def adapter_options(self) -> tuple[Option, ...]:
        """The static options the torch and JAX entry points take (all but ``backend`` and ``stream``)."""
        return tuple(o for o in self.static_options if o.adapters)

    @functools.cached_property
    def has_state(self) -> bool:
        return any(o.name == "final_state" for o in self.outputs)

    @functools.cached_property
    def takes(self) -> frozenset[str]:
        return frozenset(self.params)




def _bool(name: str, doc: str) -> Option:
    return Option(name, False, "bool", doc)


# Arguments every op may take, declared once. initial_state is an array of the family (its shape is the family's
# state shape); its documentation comes from there.
COMMON: dict[str, Option] = {
    "scale": Option("scale", None, "float | None", "query scale. Default: ``K ** -0.5``."),
    "output_final_state": _bool("output_final_state", "return the final state. Default: ``False``."),
    "cu_seqlens": Option("cu_seqlens", None, "Any",
                         "int32/int64 ``[N + 1]`` offsets of packed sequences (B must be 1); chunks never cross a "
                         "sequence; empty sequences are allowed. A device array is copied to the host once for "
                         "validation; pass ``cu_seqlens_cpu`` to avoid that synchronisation. Default: ``None``."),
    "cu_seqlens_cpu": Option("cu_seqlens_cpu", None, "Any",
                             "host copy of ``cu_seqlens``, which saves a device-to-host copy. Default: ``None``."),
    "chunk_size": Option("chunk_size", 64, "int", "tokens per chunk."),
    "state_v_first": _bool("state_v_first",
                           "states (``initial_state``, the final state, their gradients) are held transposed, "
                           "``[N, HV, V, K]`` instead of ``[N, HV, K, V]``: the layout serving engines keep. "
                           "Default: ``False``."),
    "transpose_state_layout": Option("transpose_state_layout", None, "bool | None",
                                     "the peer's older name of ``state_v_first`` (a DeprecationWarning). Default: "
                                     "``None``.", alias_of="state_v_first"),
    "inplace_final_state": _bool("inplace_final_state",
                                 "write the final state into ``initial_state`` (float32, C-contiguous) and return it; "
                                 "for decoding. The call then has no backward. Default: ``False``."),
    "backend": Option("backend", "auto", "str",
                      "``\"auto\"`` (cuda for device arrays, numpy for host arrays), ``\"cuda\"``, ``\"numba\"``, "
                      "``\"numpy\"``. Default: ``\"auto\"``.", adapters=False),
    "stream": Option("stream", None, "Any",
                     "CUDA stream for the launches (a CuPy stream or a raw ``cudaStream_t``). Default: CuPy's current "
                     "stream.", adapters=False),
}

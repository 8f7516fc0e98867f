"""TMA tensor maps for the Hopper kernels (``rawdelta/cuda/common/tma.cuh``), encoded by the driver.

A kernel takes its maps by value, as ``__grid_constant__`` parameters: :func:`kernel_maps` packs them into one
NumPy structured scalar, which CuPy passes by value like the C struct it mirrors; :func:`pass_maps` packs the state
passes' ``PassMaps`` by field name.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np

MAP_BYTES = 128  # sizeof(CUtensorMap), 64-byte aligned in the kernel's parameters
BOX_ROWS = 64  # rows per box (tma.cuh: BOX_ROWS)
_DATA_TYPES = {"float16": "CU_TENSOR_MAP_DATA_TYPE_FLOAT16", "bfloat16": "CU_TENSOR_MAP_DATA_TYPE_BFLOAT16"}
_SWIZZLES = {32: "CU_TENSOR_MAP_SWIZZLE_32B", 64: "CU_TENSOR_MAP_SWIZZLE_64B", 128: "CU_TENSOR_MAP_SWIZZLE_128B"}


class RowsMap(NamedTuple):
    """A map as the arguments of its encoding: hashable and cheap to make, so that a launch's maps are packed once
    per distinct set (:func:`pass_maps`); :meth:`words` encodes it."""

    ptr: int
    dtype_name: str
    rows: int
    heads: int
    cols: int
    box_cols: int

    def words(self) -> np.ndarray:
        """The 128 encoded bytes as 16 uint64."""
        return np.frombuffer(_encoded(*self), dtype=np.uint64)


def rows_map(array: Any, rows: int, heads: int, cols: int, box_cols: int = 64) -> RowsMap:
    """The map of boxes of 64 rows x `box_cols` columns at one head of a C-contiguous 16-bit array
    ``[rows, heads, cols]`` (any leading shape that flattens to it), in the swizzle of the box's row length (16,
    32 or 64 columns: 32, 64 or 128 bytes; tma.cuh: ``swizzled``); box coordinates (column, head, row), zeros past
    each extent."""
    if array.dtype.name not in _DATA_TYPES:
        raise TypeError(f"tensor maps: 16-bit float arrays only, got {array.dtype}")
    return RowsMap(array.data.ptr, array.dtype.name, rows, heads, cols, box_cols)


# A map is a function of these arguments alone, so the passes of one forward + backward (which encode the same
# q, k and factor maps up to three times) and the steps of a training loop (whose caching allocators hand back
# the same addresses) share encodings.
@functools.lru_cache(maxsize=1024)
def _encoded(ptr: int, dtype_name: str, rows: int, heads: int, cols: int, box_cols: int) -> bytes:
    try:
        from cuda.bindings import driver
    except ImportError as e:
        raise ImportError("the Hopper kernels' TMA copies need cuda-bindings: pip install 'rawdelta[cuda]'") from e
    u64, u32 = driver.cuuint64_t, driver.cuuint32_t
    item = 2  # the _DATA_TYPES are 16-bit
    err, tmap = driver.cuTensorMapEncodeTiled(
        getattr(driver.CUtensorMapDataType, _DATA_TYPES[dtype_name]), 3, ptr,
        [u64(cols), u64(heads), u64(rows)], [u64(cols * item), u64(heads * cols * item)],
        [u32(box_cols), u32(1), u32(BOX_ROWS)], [u32(1)] * 3,
        driver.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        getattr(driver.CUtensorMapSwizzle, _SWIZZLES[box_cols * item]),
        driver.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        driver.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE)
    if err != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed ({err.name}) for {dtype_name} [{rows}, {heads}, {cols}] "
                           f"at {ptr:#x}")
    return np.array([int(x) for x in tmap.opaque], dtype=np.uint64).tobytes()


# The fields of the state passes' PassMaps (rawdelta/cuda/common/wg_state_pass.cuh), in order.
PASS_MAPS = ("q", "k", "a", "p", "v", "plo")


def pass_maps(**maps: RowsMap | np.ndarray | None) -> np.void:
    """The state passes' ``PassMaps`` parameter from maps by field name (:data:`PASS_MAPS`; absent ones zero): each a
    :class:`RowsMap`, or its encoded words. Maps given as RowsMap are packed once per distinct set (a launch's
    arguments; the same each step of a loop whose allocator hands back the same addresses)."""
    unknown = set(maps) - set(PASS_MAPS)
    if unknown:
        raise ValueError(f"pass_maps: unknown fields {sorted(unknown)}; expected some of {PASS_MAPS}")
    ordered = tuple(maps.get(name) for name in PASS_MAPS)
    if all(m is None or isinstance(m, RowsMap) for m in ordered):
        return _packed(ordered)
    return kernel_maps(*ordered)


@functools.lru_cache(maxsize=1024)
def _packed(maps: tuple[RowsMap | None, ...]) -> np.void:
    return kernel_maps(*maps)


def kernel_maps(*maps: RowsMap | np.ndarray | None) -> np.void:
    """Maps (each a :class:`RowsMap` or its encoded words) as one by-value kernel parameter: a struct of
    ``len(maps)`` TmaMap (absent ones zero)."""
    dtype = np.dtype([("opaque", np.uint64, (len(maps), MAP_BYTES // 8))], align=True)
    packed = np.zeros((), dtype)
    for i, m in enumerate(maps):
        if m is not None:
            packed["opaque"][i] = m.words() if isinstance(m, RowsMap) else m
    return packed[()]

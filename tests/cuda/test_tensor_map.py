"""Packing of TMA tensor maps into one by-value kernel parameter (no GPU needed; encoding is tested on the GPU
through the Hopper kernels that use the maps)."""

from __future__ import annotations

import functools
import types

import numpy as np
import pytest

from rawdelta.cuda import tensor_map


def test_kernel_maps_lays_maps_out_like_the_struct() -> None:
    a = np.arange(16, dtype=np.uint64)
    b = np.arange(100, 116, dtype=np.uint64)
    packed = tensor_map.kernel_maps(a, None, b)
    assert isinstance(packed, np.void)
    assert packed.dtype.itemsize == 3 * tensor_map.MAP_BYTES
    words = np.frombuffer(packed.tobytes(), dtype=np.uint64).reshape(3, 16)
    np.testing.assert_array_equal(words[0], a)
    np.testing.assert_array_equal(words[1], 0)  # an absent map is zeros
    np.testing.assert_array_equal(words[2], b)


def test_pass_maps_follow_the_struct_fields() -> None:
    """pass_maps packs by field name in the order of the C struct PassMaps (wg_state_pass.cuh)."""
    import re
    from pathlib import Path

    import rawdelta

    src = (Path(rawdelta.__file__).parent / "cuda" / "common" / "wg_state_pass.cuh").read_text()
    fields = re.search(r"struct PassMaps \{\s*TmaMap ([\w, ]+);", src).group(1).replace(" ", "").split(",")
    assert tuple(fields) == tensor_map.PASS_MAPS
    m = np.arange(16, dtype=np.uint64)
    words = np.frombuffer(tensor_map.pass_maps(plo=m).tobytes(), dtype=np.uint64).reshape(len(fields), 16)
    np.testing.assert_array_equal(words[fields.index("plo")], m)
    assert not words[: fields.index("plo")].any()
    with pytest.raises(ValueError, match="unknown fields"):
        tensor_map.pass_maps(scores=m)


def test_rows_maps_are_packed_once_per_distinct_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """pass_maps of RowsMap descriptions packs each one's encoding where its field is, and packs a set seen before
    from the cache (a launch's maps are the same call after call)."""
    encoded: list[tuple] = []

    def fake_encode(*args: object) -> bytes:  # the driver's encoding: a function of the map's arguments alone
        encoded.append(args)
        return np.full(16, args[0], dtype=np.uint64).tobytes()

    monkeypatch.setattr(tensor_map, "_encoded", fake_encode)
    # a cache of this test's own, so that no fake encoding outlives it in the module's
    monkeypatch.setattr(tensor_map, "_packed", functools.lru_cache(maxsize=8)(tensor_map._packed.__wrapped__))

    class Device16:  # what rows_map reads of a device array
        def __init__(self, ptr: int, dtype: str = "bfloat16") -> None:
            self.dtype = types.SimpleNamespace(name=dtype)
            self.data = types.SimpleNamespace(ptr=ptr)

    k, v = tensor_map.rows_map(Device16(4096), 128, 2, 64), tensor_map.rows_map(Device16(8192), 128, 2, 32, 32)
    assert k == tensor_map.RowsMap(4096, "bfloat16", 128, 2, 64, 64)
    first = tensor_map.pass_maps(k=k, v=v)
    again = tensor_map.pass_maps(k=tensor_map.rows_map(Device16(4096), 128, 2, 64), v=v)
    words = np.frombuffer(first.tobytes(), dtype=np.uint64).reshape(len(tensor_map.PASS_MAPS), 16)
    np.testing.assert_array_equal(words[tensor_map.PASS_MAPS.index("k")], 4096)
    np.testing.assert_array_equal(words[tensor_map.PASS_MAPS.index("v")], 8192)
    assert not words[[i for i, n in enumerate(tensor_map.PASS_MAPS) if n not in ("k", "v")]].any()
    assert again.tobytes() == first.tobytes() and len(encoded) == 2  # packed once, each map encoded once
    assert tensor_map._packed.cache_info().hits == 1
    with pytest.raises(TypeError, match="16-bit"):
        tensor_map.rows_map(Device16(0, "float32"), 128, 2, 64)

"""Packing of TMA tensor maps into one by-value kernel parameter (no GPU needed; encoding is tested on the GPU
through the Hopper kernels that use the maps)."""

from __future__ import annotations

import numpy as np

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

    import pytest

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

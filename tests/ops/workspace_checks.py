"""The adapters' workspace path of a cuda backend that keeps its forward's factors for the backward, checked the same
way for every op that has one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from rawdelta.testing import assert_same_bits, to_host


def check_through_a_workspace(res: Any, nbytes: int, read: Callable[[Any, Any], Any], bwd: Callable[..., Any],
                              want: Any, do: Any, dht: Any) -> None:
    """A forward of ``res.problem`` given a workspace of `nbytes` bytes (filled with NaN bits) gives ``res``'s outputs
    bit for bit and writes every byte of the workspace; the factors ``read(problem, workspace)`` takes back give the
    gradients `want` (of ``bwd(res, do, dht)``) bit for bit. A workspace of another size is neither written nor read
    (``read`` returns None)."""
    import cupy

    from rawdelta.ops.common.api import run_forward

    p = res.problem
    ws = cupy.full((nbytes,), 0xFF, dtype=cupy.uint8)
    outs, _ = run_forward(p, ws)
    saved = read(p, ws)
    assert saved is not None and ws.data.ptr <= saved.Ahi.data.ptr < ws.data.ptr + nbytes
    assert_same_bits(want, bwd(res._replace(saved=saved), do, dht))
    ref_outs, _ = run_forward(p, None)
    for a, b in zip(ref_outs, outs):
        if a is not None:
            np.testing.assert_array_equal(to_host(a).view(np.uint8), to_host(b).view(np.uint8))
    zeros = cupy.zeros((nbytes,), dtype=cupy.uint8)
    run_forward(p, zeros)
    np.testing.assert_array_equal(to_host(zeros), to_host(ws), err_msg="a workspace byte left unwritten")
    other = cupy.full((nbytes + 16,), 0xFF, dtype=cupy.uint8)
    run_forward(p, other)
    assert bool((other == 0xFF).all()), "a workspace of another size was written"
    assert read(p, other) is None

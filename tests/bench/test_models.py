"""The bytes/FLOPs models behind the floors."""

from __future__ import annotations

import pytest

from rawdelta.bench.models import (
    MODELS,
    Work,
    floor_seconds,
    gdn_chunk,
    gdn_recurrent,
    gla_chunk,
    gla_recurrent,
    softmax_attention,
)


def test_decode_moves_the_state_twice():
    N, H, D = 64, 32, 128
    w = gdn_recurrent((N, 1, H, D), "decode", 2)
    state = 2 * N * H * D * D * 4  # 268 MB, the figure in device.md
    io = N * H * (4 * D * 2 + 2 * 4)
    assert state == 268_435_456
    assert w.bytes == state + io
    assert w.flops == 7 * N * H * D * D


def test_backward_adds_bytes_and_three_times_the_flops():
    shape = (8, 2048, 16, 128)
    for model in (gdn_chunk, gdn_recurrent):
        f, fb = model(shape, "forward", 2), model(shape, "forward+backward", 2)
        assert fb.flops == 4 * f.flops
        assert fb.bytes > 2 * f.bytes
    assert gdn_chunk(shape, "forward", 2).flops > gdn_recurrent(shape, "forward", 2).flops


def test_gla_models():
    shape = (2, 1024, 4, 64)
    B, T, H, D = shape
    for model in (gla_chunk, gla_recurrent):
        f, fb = model(shape, "forward", 2), model(shape, "forward+backward", 2)
        assert fb.flops == 4 * f.flops and fb.bytes > 2 * f.bytes
    assert gla_recurrent(shape, "forward", 2).flops == 5 * B * T * H * D * D
    # the per-key gate is read as float32: D floats per token and head where GDN reads two
    extra = gla_recurrent(shape, "forward", 2).bytes - gdn_recurrent(shape, "forward", 2).bytes
    assert extra == B * T * H * (D - 2) * 4
    assert gla_recurrent((64, 1, 8, 64), "decode", 2).bytes > 2 * 64 * 8 * 64 * 64 * 4


def test_causal_attention_flops():
    B, T, H, D = 2, 1024, 4, 64
    assert softmax_attention((B, T, H, D), "forward", 2).flops == 2 * B * H * T * T * D
    assert softmax_attention((B, T, H, D), "forward+backward", 2).flops == 7 * B * H * T * T * D


def test_the_floor_is_the_larger_bound():
    assert floor_seconds(Work(bytes=100, flops=10), 100.0, 100.0) == (1.0, "memory")
    assert floor_seconds(Work(bytes=10, flops=1000), 100.0, 100.0) == (pytest.approx(10.0), "compute")
    assert floor_seconds(Work(bytes=10, flops=10), None, None) == (None, "")
    assert set(MODELS) == {"gdn_recurrent", "gdn_chunk", "gla_recurrent", "gla_chunk", "softmax_attention"}

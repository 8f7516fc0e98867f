"""The choice of segments for the segmented state passes (``rawdelta/ops/common/segments.py``): host logic, no GPU."""

from __future__ import annotations

import pytest

from rawdelta.ops.common.segments import MAX_SEGMENTS, MIN_SEGMENT_CHUNKS, segment_count, segments_allowed


@pytest.mark.parametrize(("T", "segments", "varlen", "allowed"), [
    (8192, 1, True, True),  # no segmenting is always allowed
    (8192, 4, False, True),
    (8192, 4, True, False),  # varlen: segments would not be whole chunks of equal-length sequences
    (8192 + 64, 4, False, False),  # 129 chunks do not cut into 4 equal segments
    (8192, 3, False, False),
    (64 * 2 * MAX_SEGMENTS, 2 * MAX_SEGMENTS, False, False),
])
def test_segments_allowed(T: int, segments: int, varlen: bool, allowed: bool) -> None:
    assert segments_allowed(T, 64, segments, object() if varlen else None) is allowed


def test_segment_count() -> None:
    sms = 132
    # two sequences of 128 chunks, 32 blocks each: as many segments as keep MIN_SEGMENT_CHUNKS chunks (two blocks per
    # SM would take more)
    assert segment_count(2, 8192, 64, None, 32, sms) == 8192 // (64 * MIN_SEGMENT_CHUNKS)
    # the fewest segments giving two blocks per SM
    assert segment_count(2, 8 * 8192, 64, None, 32, sms) == 8
    # sequences whose blocks fill the SMs, or varlen: none
    assert segment_count(8, 2048, 64, None, 32, sms) == 1
    assert segment_count(2, 8192, 64, object(), 32, sms) == 1
    # too short to cut: segments keep at least MIN_SEGMENT_CHUNKS chunks
    assert segment_count(1, 64 * MIN_SEGMENT_CHUNKS * 2, 64, None, 4, sms) == 2
    assert segment_count(1, 64 * (MIN_SEGMENT_CHUNKS * 2 - 1), 64, None, 4, sms) == 1
    # a long single sequence with few blocks: the most allowed
    assert segment_count(1, 64 * MIN_SEGMENT_CHUNKS * MAX_SEGMENTS, 64, None, 4, sms) == MAX_SEGMENTS

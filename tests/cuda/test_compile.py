"""Every registered CUDA instantiation compiles to sm_80, sm_90 and sm_90a cubins with NVRTC, no GPU needed."""

from __future__ import annotations

import pytest

from rawdelta.cuda import loader

pytest.importorskip("cuda.core", reason="cuda-core (NVRTC) is part of the test extra")


def test_registry_is_not_empty():
    specs = loader.registered()
    assert specs, "no CUDA instantiations registered"
    assert sum(len(s.name_expressions) for s in specs) > 10


def test_every_instantiation_compiles_for_sm80_sm90_and_sm90a():
    archs = ("sm_80", "sm_90", "sm_90a")  # sm_90a: the wgmma kernels' Hopper code
    results = loader.compile_all_to_cubin(archs)
    sources = {s.source for s in loader.registered()}
    for src in sources:
        for arch in archs:
            assert results[(src, arch)] > 0


def test_compile_error_carries_log_and_name(tmp_path, monkeypatch):
    from rawdelta.errors import KernelCompileError

    bad = loader.CUDA_DIR / "_test_broken.cu"
    bad.write_text("template <typename T> __global__ void broken_kernel(T* x) { x[0] = undefined_symbol; }\n")
    try:
        loader.register("_test_broken.cu", ["broken_kernel<float>"])
        with pytest.raises(KernelCompileError) as ei:
            loader.compile_all_to_cubin(("sm_80",))
        msg = str(ei.value)
        assert "_test_broken.cu" in msg and "undefined_symbol" in msg
    finally:
        with loader._lock:
            loader._REGISTRY.pop(("_test_broken.cu", ()), None)
        bad.unlink()

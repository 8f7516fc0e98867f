"""Every registered CUDA instantiation compiles with NVRTC for the targets it runs on (sm_80 and sm_90; the Hopper
kernels for sm_90a), no GPU needed; the check compiles with ``-Ofast-compile=max`` (``background_compile.py``)."""

from __future__ import annotations

import pytest

from rawdelta.cuda import loader
from rawdelta.ops.registry import import_kernel_modules

from . import background_compile

pytest.importorskip("cuda.core", reason="cuda-core (NVRTC) is part of the test extra")


@pytest.fixture(scope="module", autouse=True)
def _every_op_registered() -> None:
    import_kernel_modules()


def test_registry_is_not_empty():
    specs = loader.registered()
    assert specs, "no CUDA instantiations registered"
    assert sum(len(s.name_expressions) for s in specs) > 10
    assert any(s.targets == loader.HOPPER_TARGETS for s in specs), "no Hopper instantiations registered"


def test_every_instantiation_compiles_for_sm80_sm90_and_sm90a():
    specs, results = background_compile.result()  # started when collection ended (background_compile.py)
    assert specs == loader.registered(), "an instantiation was registered after the compile check started"
    for spec in specs:
        for arch in spec.targets:
            assert results[(spec.source, arch)] > 0, (spec.source, arch)


# A front-end error and an assembler error (an instruction the target lacks): the check's fast compile stops at both,
# as the full one does.
BROKEN = {
    "front_end": ("template <typename T> __global__ void broken_kernel(T* x) { x[0] = undefined_symbol; }\n",
                  "undefined_symbol"),
    "assembler": ('template <typename T> __global__ void broken_kernel(T* x) { asm volatile("wgmma.fence.sync.aligned;"'
                  ' ::: "memory"); x[0] = 1; }\n', "wgmma.fence"),
}


@pytest.mark.parametrize("fast", [False, True], ids=["full", "fast"])
@pytest.mark.parametrize("stage", list(BROKEN))
def test_compile_error_carries_log_and_name(stage: str, fast: bool):
    from rawdelta.errors import KernelCompileError

    text, needle = BROKEN[stage]
    bad = loader.CUDA_DIR / "_test_broken.cu"
    bad.write_text(text)
    try:
        loader.register("_test_broken.cu", ["broken_kernel<float>"])
        with pytest.raises(KernelCompileError) as ei:
            loader.compile_all_to_cubin(("sm_80",), sources=("_test_broken.cu",), fast=fast)
        msg = str(ei.value)
        assert "_test_broken.cu" in msg and needle in msg
    finally:
        with loader._lock:
            loader._REGISTRY.pop(("_test_broken.cu", ()), None)
        bad.unlink()

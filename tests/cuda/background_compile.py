"""The NVRTC compile check of every registered instantiation (``test_compile.py``), started as soon as collection
ends so that its worker processes run beside the rest of the suite rather than after it: the check is most of the
CPU suite's time, and the other tests take one core. It compiles with ``-Ofast-compile=max``
(``loader.compile_all_to_cubin``'s ``fast``: what makes a kernel fail to build does not depend on the device
optimisations it cuts, and the whole check takes about a fifth of the time)."""

from __future__ import annotations

import threading
from typing import Any

CHECK = "tests/cuda/test_compile.py::test_every_instantiation_compiles_for_sm80_sm90_and_sm90a"

_thread: threading.Thread | None = None
_outcome: dict[str, Any] = {}


def start() -> None:
    """Register every op's instantiations and start compiling them in a background thread (the work is in
    ``loader.compile_all_to_cubin``'s spawned processes); once per session. The sources are taken here, before
    any test runs, so a test that registers a source of its own (the broken one of ``test_compile.py``) is not
    among them."""
    global _thread
    if _thread is not None:
        return
    from rawdelta.cuda import loader
    from rawdelta.ops.registry import import_kernel_modules

    import_kernel_modules()
    specs = loader.registered()
    _outcome["specs"] = specs

    def run() -> None:
        try:
            _outcome["result"] = loader.compile_all_to_cubin(loader.ALL_TARGETS,
                                                             sources=tuple(sorted({s.source for s in specs})),
                                                             fast=True)
        except BaseException as e:  # re-raised by result(), in the test that waits for it
            _outcome["error"] = e

    _thread = threading.Thread(target=run, name="nvrtc-compile-check", daemon=True)
    _thread.start()


def result() -> tuple[list[Any], dict[tuple[str, str], int]]:
    """The specs compiled (``loader.registered()`` when the compile started) and ``loader.compile_all_to_cubin``'s
    result for them, waiting for it (started here if it was not)."""
    start()
    assert _thread is not None
    _thread.join()
    if "error" in _outcome:
        raise _outcome["error"]
    return _outcome["specs"], _outcome["result"]

"""Which CUDA kernels a call launched: for the tests that check which path (mma.sync or Hopper) ran."""

from __future__ import annotations

from typing import Any


def record_launches(monkeypatch: Any, prefix: str = "") -> list[str]:
    """From now on, the name of every kernel launched through ``rawdelta.cuda.launch`` (those starting with `prefix`),
    in the order their launches are built (``launch.prepared_launch``, through which every launch there goes: all of
    the CUDA chunked op's)."""
    from rawdelta.cuda import launch

    names: list[str] = []
    prepared_launch = launch.prepared_launch

    def spy(source: str, name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith(prefix):
            names.append(name)
        return prepared_launch(source, name, *args, **kwargs)

    monkeypatch.setattr(launch, "prepared_launch", spy)
    return names

"""Gated delta rule (GatedDeltaNet, Qwen3-Next): recurrent and chunked modes and their float64 references.

README.md beside this file has the math; definition.py declares the ops, from which their public functions are
generated (``rawdelta/ops/common/api.py``).
"""

from ..common.api import family_exports
from .definition import CHUNK, FAMILY, RECURRENT

OPS = (RECURRENT, CHUNK)
_EXPORTS = family_exports(FAMILY, OPS)
globals().update(_EXPORTS)
__all__ = sorted(_EXPORTS)

"""GLA (gated linear attention, per-key gates): recurrent and chunked modes and their float64 references.

README.md beside this file has the math; definition.py declares the ops, from which their public functions are
generated (``rawdelta/ops/common/api.py``).
"""

from ..common.api import family_exports
from .definition import CHUNK, FAMILY, FUSED_CHUNK, RECURRENT

OPS = (RECURRENT, CHUNK, FUSED_CHUNK)
_EXPORTS = family_exports(FAMILY, OPS)
globals().update(_EXPORTS)
__all__ = sorted(_EXPORTS)

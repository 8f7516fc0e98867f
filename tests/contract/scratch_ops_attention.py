"""The numpy backend module of the scratch attention op (tests/contract/scratch_ops.py): the backend protocol's two
functions, which a backend module exports under these names."""

from .scratch_ops import attention_backward as backward
from .scratch_ops import attention_forward as forward

__all__ = ["backward", "forward"]

"""Where a warning points: the first frame of the user's code."""
from __future__ import annotations

import torch


def user_stacklevel() -> int:
    """The ``stacklevel`` (for a ``warnings.warn`` in the calling function) of the first frame outside
    quantkern and torch, so a warning points at the user's code whatever wrappers sit between
    (``torch.compiler.disable``, ``no_grad``, nn.Module's call machinery)."""
    import os
    import sys

    skip = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(torch.__file__))
    f, level = sys._getframe(1), 1
    while f is not None and f.f_code.co_filename.startswith(skip):
        f, level = f.f_back, level + 1
    return level

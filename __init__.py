"""tca: activation caches for model diffing with transcoder adapters.

The stages live in sub-packages, imported one way only:
``cli -> query -> adapted -> train -> kernels, cache``.
"""

from typing import Literal

__version__ = "0.1.0"

Device = Literal["auto", "cpu", "cuda"]
"""Where a command computes; auto: CUDA when present."""
ModelDtype = Literal["auto", "float32", "bfloat16", "float16"]
"""The dtype models run in; auto: the checkpoint's own on CUDA, float32 on CPU."""


class TcaError(Exception):
    """A problem the user can fix (bad input, a store that does not match, a full disk).

    The CLI prints its message as one sentence and exits non-zero, without a traceback;
    raise it with a message that says what is wrong and what to do instead.
    """

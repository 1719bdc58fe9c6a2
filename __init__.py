"""tca: activation caches for model diffing with transcoder adapters.

The stages live in sub-packages, imported one way only:
``cli -> query -> train -> kernels, cache``.
"""

__version__ = "0.1.0"


class TcaError(Exception):
    """A problem the user can fix (bad input, a store that does not match, a full disk).

    The CLI prints its message as one sentence and exits non-zero, without a traceback;
    raise it with a message that says what is wrong and what to do instead.
    """

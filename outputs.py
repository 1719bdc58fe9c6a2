"""How every command writes a file or folder the user named: never over an input or an existing
output unless asked, and never half-written.

A command calls ``check_output`` before it loads anything (so a refusal costs nothing), then
writes through ``atomic_file`` / ``atomic_dir``: the result appears under its name only once it
is complete, and a failure leaves the disk as it was (folders made for it included).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from tca import TcaError


def check_not_input(out: str | Path, inputs: Iterable[str | Path | None], flag: str = "--out") -> Path:
    """Refuse, in one sentence, an output whose writing would replace (part of) an input: the input
    itself, a folder holding an input, or an existing path inside an input folder."""
    path = Path(out)
    resolved = path.resolve()
    for source in inputs:
        if source is None or "://" in str(source):
            continue
        src = Path(source).resolve()
        if src == resolved:
            raise TcaError(f"{flag} {out} is also an input of this command; choose another path.")
        if resolved in src.parents:
            raise TcaError(f"{flag} {out} holds the input {source}; choose a path outside it.")
        if src in resolved.parents and path.exists():
            raise TcaError(f"{flag} {out} is part of the input {source}; choose a path outside it.")
    return path


def check_output(out: str | Path, overwrite: bool, inputs: Iterable[str | Path | None] = (), flag: str = "--out") -> Path:
    """Refuse, in one sentence, an output that would replace an input (``check_not_input``), or
    that exists without ``overwrite``."""
    path = check_not_input(out, inputs, flag)
    if path.exists() and not overwrite:
        raise TcaError(f"{flag} {out} already exists; pass --overwrite to replace it.")
    return path


@contextlib.contextmanager
def _parents_of(path: Path) -> Iterator[None]:
    """Make ``path``'s missing parent folders; remove them again (if still empty) on failure."""
    made = [p for p in reversed(path.parents) if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (not yet created, as writers such as DuckDB want to
    create the file themselves); on success it replaces ``path``, on failure it is removed."""
    path = Path(path)
    with _parents_of(path):
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f"{path.suffix}.partial", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        tmp.unlink()
        try:
            yield tmp
            if path.is_dir():
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path``, on failure it is removed."""
    path = Path(path)
    with _parents_of(path):
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
        try:
            yield tmp
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
                os.replace(path, old / path.name)
                os.replace(tmp, path)
                shutil.rmtree(old)
            else:
                os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

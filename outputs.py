"""How every command writes a file or folder the user named: never over an input or an existing
output unless asked, and never half-written.

A command calls ``check_output`` before it loads anything (so a refusal costs nothing), then
writes through ``atomic_file`` / ``atomic_dir``: the result appears under its name only once it
is complete, and a failure leaves the disk as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from tca import TcaError


def check_output(out: str | Path, overwrite: bool, inputs: Iterable[str | Path | None] = (), flag: str = "--out") -> Path:
    """Refuse, in one sentence, an output that is one of the inputs or that exists without ``overwrite``."""
    path = Path(out)
    resolved = path.resolve()
    for source in inputs:
        if source is not None and "://" not in str(source) and Path(source).resolve() == resolved:
            raise TcaError(f"{flag} {out} is also an input of this command; choose another path.")
    if path.exists() and not overwrite:
        raise TcaError(f"{flag} {out} already exists; pass --overwrite to replace it.")
    return path


def _temporary_beside(path: Path, suffix: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f"{suffix}.partial", dir=path.parent)
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on failure it is removed."""
    path = Path(path)
    tmp = _temporary_beside(path, path.suffix)
    tmp.unlink()  # writers such as DuckDB want to create the file themselves
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
    path.parent.mkdir(parents=True, exist_ok=True)
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

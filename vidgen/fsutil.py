"""Atomic file writes: write beside the target under a hidden temporary name, then rename.

A crash never leaves a half-written file under the final name, and a failed rewrite leaves
the previous file as it was. The published file gets the permissions an ordinary ``open``
would give it (the process umask), or those of the file it replaces, not ``mkstemp``'s 0600.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


def temp_beside(path: Path, suffix: str = ".tmp") -> Path:
    """A new empty hidden file in ``path``'s folder (created if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(name)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` onto ``final`` atomically, with ordinary permissions."""
    try:
        mode = stat.S_IMODE(os.stat(final).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    os.chmod(tmp, mode)
    os.replace(tmp, final)

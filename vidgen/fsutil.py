"""Atomic file writes: write beside the target under a hidden temporary name, then rename.

A crash never leaves a half-written file under the final name, and a failed rewrite leaves
the previous file as it was; the file's bytes and the rename are flushed to disk
(``fsync``) before ``publish`` returns, so a power loss does not leave an empty file under
the final name either. The published file gets the permissions an ordinary ``open`` would
give it (the kernel applies the umask at creation; the umask is never changed, which would
race with other threads), or those of the file it replaces.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

STEM_BYTES = 64  # the hidden name stays well under 255 bytes for any valid final name


def expand_user(path: str | os.PathLike) -> Path:
    """``path`` with a leading ``~`` or ``~user`` expanded, as a shell does: left as it is
    where there is no such user or home folder (``~draft.mp4`` is a file of that name; Python's
    ``expanduser`` raised RuntimeError there, a traceback instead of a clear error)."""
    path = Path(path)
    try:
        return path.expanduser()
    except RuntimeError:
        return path


def temp_stem(path: Path) -> str:
    """The stem of ``path``'s temporary names: its own, or for a long one its first bytes
    and a hash of the whole, so that the temp files of two long names that begin alike
    stay apart (a cleanup of one must never take the other's)."""
    stem = path.stem
    raw = os.fsencode(stem)  # the name's bytes: a non-UTF-8 one has no str.encode()
    if len(raw) <= STEM_BYTES:
        return stem
    # Cut by bytes, not characters: 64 four-byte characters would be 256 bytes.
    head = os.fsdecode(raw[: STEM_BYTES - 13].decode("utf-8", "ignore").encode())
    return f"{head}~{hashlib.sha256(raw).hexdigest()[:12]}"


def target(path: Path) -> Path:
    """Where a write to ``path`` goes: through a symlink, to the file it points to (a
    rename over the link would replace the link and leave its target stale)."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def temp_beside(path: Path, suffix: str = ".tmp") -> Path:
    """A new empty hidden file in ``path``'s folder (created if missing), named
    ``.<temp_stem>.<8 hex><suffix>`` (beside a symlink's target, as ``publish`` writes it)."""
    path = target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{temp_stem(path)}.{secrets.token_hex(4)}{suffix}"
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp


# The names temp_beside makes: ".<stem>.<8 hex><suffix>", every suffix starting ".tmp".
_TEMP_NAME = re.compile(r"\..*\.[0-9a-f]{8}\.tmp(\.[^/]*)?")


def remove_temps(folder: Path) -> int:
    """Remove the temporary files a killed writer left in ``folder`` (its files named as
    ``temp_beside`` names them; nothing else, no subfolders); returns how many. Only for a
    folder no other process is writing to."""
    if not folder.is_dir():
        return 0
    removed = 0
    for path in folder.iterdir():
        if _TEMP_NAME.fullmatch(path.name) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing, never removed) while the
    block runs; ``BlockingIOError`` at once if another process holds it."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)  # releases the lock


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` onto ``final`` atomically, with ordinary permissions,
    and flush both the file and the folder's entry to disk. A symlink ``final`` keeps
    pointing where it did: its target is replaced."""
    final = target(final)
    # A new file keeps the mode it was created with (0666 less the umask).
    with contextlib.suppress(FileNotFoundError):
        os.chmod(tmp, stat.S_IMODE(os.stat(final).st_mode))
    _fsync(tmp)
    os.replace(tmp, final)
    # A folder that cannot be opened or synced (some network filesystems) is left as is.
    with contextlib.suppress(OSError):
        _fsync(final.parent)

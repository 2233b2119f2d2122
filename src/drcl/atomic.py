"""Atomic file writes: a temporary file in the same folder, flushed and fsynced, then renamed
over the target (``os.replace`` is atomic on POSIX) and the folder fsynced. A reader, or a
process killed mid-write, sees the old file or the new one, never half of one.

The file gets the mode a plain ``open(path, "w")`` would give it: an existing target keeps its
permission bits, a new one gets 0666 less the umask (0644 under the usual 022), not the 0600
that :func:`tempfile.mkstemp` creates its files with (which would hide checkpoints and exported
weights from a group sharing them)."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path


def _umask() -> int:
    """The process umask. Read from /proc where Linux has it: setting and restoring it (the only
    portable way) would briefly give files that other threads create meanwhile a 0 umask."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _new_file_mode(target: Path) -> int:
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(binary_file)`` on a temporary file, then move it to ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _new_file_mode(target))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return target


def write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))

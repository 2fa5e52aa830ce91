"""Writing files whole: a temporary file beside the target, renamed over it, with the umask's mode."""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .errors import ConfigError, EdgeError, TensorFormatError

__all__ = ["load_arrays", "read_bounded", "save_text", "stage", "umask_mode", "write_atomic"]


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` less the process's umask: what ``open()`` would give a new file."""
    current = os.umask(0)
    os.umask(current)
    return mode & ~current


def stage(directory: Path, name: str, data: bytes) -> Path:
    """Write ``data`` to a temporary file in ``directory`` (readable as ``open()`` would make it) and
    return its path; the caller renames it into place with ``os.replace`` or deletes it.

    ``mkstemp`` creates files with mode 0600, which would hide them from a service's user.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, umask_mode())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all (staged beside it, then renamed), creating its directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = stage(path.parent, path.name, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_bounded(path: Path, limit: int, what: str) -> str:
    """``path``'s text; ConfigError when it passes ``limit`` bytes (checked before it is read: a 1 GB
    calibration took 63 s and 4.8 GB) or cannot be read."""
    try:
        size = path.stat().st_size
        if size > limit:
            raise ConfigError(f"{path}: {size:,} bytes; a {what} holds at most {limit:,}")
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read: {getattr(err, 'strerror', None) or err}") from err


def save_text(path: Path, text: str) -> None:
    """:func:`write_atomic` for a file the user named: EdgeError when it cannot be written."""
    try:
        write_atomic(path, text.encode())
    except OSError as err:
        raise EdgeError(f"cannot write {path}: {err.strerror or err}") from err


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz (by name), or of an .npy (as ``{"": array}``), loaded now; one
    TensorFormatError naming the file for anything that is not one (empty, truncated, pickled)."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return {"": loaded}
        with loaded:
            return {name: loaded[name] for name in loaded.files}
    except FileNotFoundError as err:
        raise TensorFormatError(f"{path}: not a readable .npy or .npz file (no such file)") from err
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        what = "empty" if Path(path).is_file() and Path(path).stat().st_size == 0 else f"not readable: {err}"
        raise TensorFormatError(f"{path}: not a readable .npy or .npz file ({what})") from err

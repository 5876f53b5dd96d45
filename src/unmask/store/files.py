"""Crash-safe file writing: a reader sees the old file or the new one, never a torn one."""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path


def atomic_write(
    path: str | os.PathLike,
    write: Callable[[Path], None],
    io_errors: tuple[type[BaseException], ...] = (),
) -> None:
    """Call `write(tmp)` to fill a temporary file in `path`'s folder, then rename it to `path`.

    The temporary file is flushed to disk before the rename and removed if `write` fails, so an
    interrupted or failed save leaves any previous `path` intact. The file gets the permissions
    `open()` would give a new file (0666 minus the process umask), not mkstemp's private 0600,
    whatever permissions `write` leaves on it.

    `io_errors`: exception types by which `write` reports a failed write without raising OSError
    (safetensors' SafetensorError, torch.save's RuntimeError on a full disk); they are raised as
    an OSError that names `path` and says the previous file is unchanged.
    """
    path = Path(path)
    tmp = _new_temporary(path)
    try:
        # The mode a new file gets here, as open() would create it (umask, default ACLs).
        mode = stat.S_IMODE(tmp.stat().st_mode)
        try:
            write(tmp)
        except OSError:
            raise
        except io_errors as err:
            raise OSError(
                f"could not write {path}: {err}; the disk may be full or failing. Any previous "
                f"{path.name} was left unchanged: free some space and run again"
            ) from err
        if stat.S_IMODE(tmp.stat().st_mode) != mode:
            os.chmod(tmp, mode)  # some writers (safetensors' save_file) replace it with a 0600 one
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _new_temporary(path: Path) -> Path:
    """Create an empty, new file `.NAME.RANDOM.tmp` next to `path`, mode 0666 & ~umask.

    O_EXCL makes the creation fail, instead of following a link or reusing a file, when the name
    exists; another random name is then tried.
    """
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a new temporary file next to {path}")


def remove_stale_temporaries(folder: str | os.PathLike, names: tuple[str, ...]) -> None:
    """Delete the temporary files `atomic_write` left for `names` in `folder` when killed.

    Call it only while no other writer of these names can be running (e.g. under a lock).
    """
    for name in names:
        for tmp in Path(folder).glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically; see `atomic_write`."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

"""Writing files so that nothing is ever left half-written: write a temp file beside the target,
then rename it over the target (atomic on one filesystem). Every file the project writes goes
through `atomic_write`.

- A process killed at any point (kill -9 included) leaves under the final name either the old
  file or the new one, whole (tests/test_faults.py kills writers at random points to check it).
  What it can leave is its temp file, named `.NAME.tmp.HOST.PID.THREAD`; `clean_stale_temps`
  removes those of processes that are gone, and every `atomic_write` calls it for its folder.
- The temp file is made with the permissions any new file gets under the user's umask (0666 minus
  the umask), so a renamed file is as readable as one written in place; `tempfile.mkstemp` would
  leave it 0600.
- A full disk (or quota) becomes a `DiskFullError` (a UserError) naming the file, its folder and,
  where the caller says, the setting that chooses the folder (`field`; "disk" when none does);
  the old file is left as it was and the temp file removed.
- `durable=True` (the default) fsyncs the file before the rename and the folder after it, so the
  rename cannot reach the disk before the data (power loss). The latent cache, which can be
  rebuilt, skips that.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import socket
import threading
import time
from typing import Callable

from .errors import UserError

_umask_lock = threading.Lock()

DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# below this many free bytes after a failed write, the failure is taken for a full disk even when
# the writer's error does not say so (torch.save reports a short write as "unexpected pos")
NEARLY_FULL_BYTES = 1 << 20
# a temp file untouched this long is removed even when its writer cannot be checked (another
# host sharing the folder, or no way to test a pid here): no save takes a day
STALE_ANY_HOST_SECONDS = 24 * 3600
# a dead writer's temp file is removed once it has not changed for this long (a writer in another
# pid namespace on the same host would still be changing it)
STALE_DEAD_PID_SECONDS = 60

TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp\.(?P<host>[0-9a-f]{8})\.(?P<pid>\d+)\.(?P<tid>\d+)$")


class DiskFullError(UserError):
    """No space left (or quota exceeded) while writing `path`; the old file is untouched."""

    def __init__(self, field: str, path: str, free: int | None):
        folder, name = os.path.split(os.path.abspath(path))
        left = f" ({_size(free)} free)" if free is not None else ""
        other = f" or choose another folder ({field})" if field != "disk" else ""
        super().__init__(field, f"no space left on device writing {name} in {folder}{left}; "
                                f"free some space there{other}")
        self.path = path
        self.folder = folder


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def default_file_mode() -> int:
    """0o666 minus the process umask (read without changing it where /proc tells it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:  # elsewhere: set and restore (briefly process-wide)
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


HOST_TAG = _host_tag()


def temp_path_for(path: str) -> str:
    """`.NAME.tmp.HOST.PID.THREAD` beside `path`: hidden, never ending in the target's extension
    (so no loader lists it), and telling `clean_stale_temps` whose it is."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.tmp.{HOST_TAG}.{os.getpid()}.{threading.get_ident()}")


def _pid_alive(pid: int) -> bool | None:
    """True / False where the platform can tell without touching the process; None elsewhere."""
    if os.name != "posix":
        return None  # os.kill(pid, 0) on Windows would send CTRL_C_EVENT
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    except OSError:
        return None
    return True


def clean_stale_temps(folder: str, now: float | None = None) -> list[str]:
    """Remove the temp files `atomic_write` left in `folder` when its process died mid-write
    (kill -9, power loss): those of a process of this host that is gone and untouched for a minute,
    and any untouched for a day. Live writers' files are kept. Returns the paths removed."""
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith("."):
            continue
        m = TEMP_NAME.match(entry.name)
        if m is None:
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
            if not entry.is_file(follow_symlinks=False):
                continue
        except OSError:
            continue
        stale = age > STALE_ANY_HOST_SECONDS
        if not stale and m["host"] == HOST_TAG and age > STALE_DEAD_PID_SECONDS:
            stale = _pid_alive(int(m["pid"])) is False
        if stale:
            try:
                os.remove(entry.path)
                removed.append(entry.path)
            except OSError:
                pass
    return removed


def _free_bytes(folder: str) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _is_disk_full(error: BaseException, folder: str) -> bool:
    """ENOSPC / EDQUOT, as an OSError or in the text of a library's own error (safetensors:
    'No space left on device (os error 28)'), or any write error with the folder's disk (nearly)
    full while the partial temp file still takes its space."""
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        return True
    text = str(error).lower()
    if "no space left" in text or "quota exceeded" in text or \
            any(f"os error {n})" in text for n in DISK_FULL_ERRNOS):
        return True
    free = _free_bytes(folder)
    return free is not None and free < NEARLY_FULL_BYTES


def _fsync_path(path: str, directory: bool = False) -> None:
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if directory else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:
            return  # Windows and some filesystems cannot open a folder; nothing to sync there
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[str], None], *, field: str = "disk",
                 durable: bool = True) -> None:
    """Call `write(tmp_path)` to produce the content, then rename it to `path`. The folder is
    created if missing; on any error the temp file is removed and `path` is left as it was.
    A full disk raises DiskFullError naming `field`: the setting that chooses the folder, or
    "disk" where no one setting does."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        write(tmp)
        if durable:
            _fsync_path(tmp)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException as e:
        full = isinstance(e, Exception) and not isinstance(e, UserError) and \
            _is_disk_full(e, folder)
        free = _free_bytes(folder) if full else None
        _remove_quietly(tmp)
        if full:
            raise DiskFullError(field, path, free) from e
        raise
    if durable:
        _fsync_path(folder, directory=True)
    clean_stale_temps(folder)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError:
        pass  # removal can fail too (a read-only mount): the original error is what matters


def atomic_write_bytes(path: str, data: bytes, **options) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write, **options)


def atomic_write_text(path: str, text: str, **options) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), **options)

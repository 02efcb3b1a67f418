"""Writing files so that nothing is ever left half-written: write a temp file beside the target,
then rename it over the target (atomic on one filesystem). Every file the project writes goes
through `atomic_write`.

The temp file is made with the permissions any new file gets under the user's umask (0666 minus
the umask), so a renamed file is as readable as one written in place; `tempfile.mkstemp` would
leave it 0600.
"""

from __future__ import annotations

import os
import threading
from typing import Callable

_umask_lock = threading.Lock()


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


def temp_path_for(path: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.tmp{os.getpid()}.{threading.get_ident()}")


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` to produce the content, then rename it to `path`. The folder is
    created if missing; on any error the temp file is removed and `path` is left as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        write(tmp)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path: str, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))

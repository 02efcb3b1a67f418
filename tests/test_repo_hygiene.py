"""No path of the machine a file was written on may reach the repository (a screenshot once showed
one: docs/tab-webui.png, since repainted). Pixels cannot be read here; text can."""

from __future__ import annotations

import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", "node_modules"}

# home and work folders of a machine; in prose also the temp folder (code may name it, e.g. a test
# of path handling, but a document has no reason to). The patterns are built from names so that
# this file holds no such path itself.
MACHINE_DIRS = ("work", "home", "Users", "root")
DOC_ONLY_DIRS = ("tmp", "var/folders")
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:%s)/|[A-Za-z]:\\Users\\" % "|".join(MACHINE_DIRS))
DOC_ONLY = re.compile(r"(?<![\w.])/(?:%s)/" % "|".join(DOC_ONLY_DIRS))
BINARY_PATH = re.compile(("/(?:%s)/" % "|".join(MACHINE_DIRS[:3])).encode())


def _files() -> list[str]:
    """The tracked files (git ls-files), or every file under the root outside a git checkout."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout
        names = [n for n in out.decode("utf-8").split("\0") if n]
        if names:
            return names
    except (OSError, subprocess.CalledProcessError):
        pass
    names = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        names += [os.path.relpath(os.path.join(folder, f), ROOT) for f in files]
    return names


def _is_doc(name: str) -> bool:
    return name.endswith((".md", ".txt", ".ini")) or name.startswith("docs/")


def test_no_machine_paths_in_the_repository():
    found = []
    names = _files()
    assert "README.md" in names and "tests/reference/README.md" in names
    for name in names:
        path = os.path.join(ROOT, name)
        if not os.path.isfile(path):  # deleted in the work tree, not yet in the index
            continue
        with open(path, "rb") as f:
            data = f.read()
        if b"\0" in data[:8192]:  # binary: its metadata chunks may still name a path
            found += [f"{name}: {m.group(0).decode()!r}"
                      for m in BINARY_PATH.finditer(data)]
            continue
        text = data.decode("utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            for pattern in (MACHINE_PATH, DOC_ONLY) if _is_doc(name) else (MACHINE_PATH,):
                if pattern.search(line):
                    found.append(f"{name}:{number}: {line.strip()[:120]}")
    assert found == []


def _path(*parts: str) -> str:
    return "/" + "/".join(parts)


def test_the_check_finds_a_machine_path():
    assert MACHINE_PATH.search(f"Dataset {_path('work', 'main', 'demo_data')}: 8 images")
    assert MACHINE_PATH.search(f"see {_path('home', 'someone', 'models')}")
    assert BINARY_PATH.search(_path("work", "main", "x.png").encode())
    assert DOC_ONLY.search(f"written to {_path('tmp', 'x', 'out.png')}")
    assert not MACHINE_PATH.search(f"datasets/shapes, .{_path('work', 'x')}, "
                                   f"data{_path('home', 'x')}, lora_train_ext/demo_data")
    assert not DOC_ONLY.search("the temp folder (tempfile.mkdtemp)")

"""scripts/check-space.sh: the Docker Space's requirements in a fresh venv, the app started as the image's CMD
starts it, as a non-root user with the hub offline, answering on its port. Docker itself cannot run here.

The script runs in a copy of the checkout with a virtual environment inside it (`python -m venv .venv` and a few
thousand package files), as a newcomer's checkout looks: the venv must stay out of the copied image contents, and
the copy must be exactly what `docker build` would copy (scripts/docker_context.py reads .dockerignore as Docker
does). Marked slow (about a minute: a venv, 64 distributions hard-linked, the app started and stopped); it runs in
the default suite; `-m "not slow"` leaves it out. It uses --reuse, which links this Python's installed packages
into the venv instead of downloading them (no network here; see the script's header for why not
--system-site-packages: this Python lives under /root, which uid 1000 cannot read)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from docker_context import context_files, excluded, read_patterns  # noqa: E402

VENV_FILES = 5000  # enough to need several tar runs under the old `xargs tar` copy (it died of SIGPIPE)
RUNTIME_FILES = ("app/__main__.py", "sparsevlm/__init__.py", "assets/models/scenes-llava/config.json",
                 "requirements.txt", "Dockerfile", "space_app.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _git_files(folder: Path) -> set[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=folder, capture_output=True,
                         check=True)
    return {f for f in out.stdout.decode().split("\0") if f}


def _checkout_with_a_venv(dest: Path) -> Path:
    """This checkout's files (tracked, and untracked but not ignored) in a fresh git folder, plus a real virtual
    environment at .venv holding VENV_FILES package files."""
    for rel in sorted(_git_files(ROOT)):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(ROOT / rel, dest / rel)
        except OSError:
            shutil.copy2(ROOT / rel, dest / rel)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest / ".venv")], check=True)
    site = next((dest / ".venv" / "lib").glob("python3*")) / "site-packages"
    for i in range(VENV_FILES):
        pkg = site / f"package_{i // 100:03d}" / "submodule"
        pkg.mkdir(parents=True, exist_ok=True)
        (pkg / f"module_{i:05d}.py").write_text("VALUE = 1\n")
    return dest


@pytest.mark.slow
def test_check_space_script_serves_the_app_as_non_root_offline(tmp_path):
    checkout = _checkout_with_a_venv(tmp_path / "checkout")
    assert len(list((checkout / ".venv").rglob("*.py"))) >= VENV_FILES
    port = _free_port()
    out = subprocess.run(["bash", "scripts/check-space.sh", "--reuse", "--port", str(port)], cwd=checkout,
                         capture_output=True, text=True, timeout=900, env={**os.environ, "PORT": str(port)})
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert "docker cannot run on this machine" in log or "a docker daemon answers here" in log
    assert "No broken requirements found" in log  # pip check in the fresh venv
    # The copy is the build context: no file of the venv, every file docker would send.
    expected = context_files(checkout)
    assert not [f for f in expected if f.startswith(".venv/")] and set(RUNTIME_FILES) <= set(expected)
    assert set(expected) <= _git_files(checkout)  # docker copies nothing git would not commit
    copied = re.search(r"copied (\d+) files: what docker build would copy", log)
    assert copied and int(copied.group(1)) == len(expected), log[-3000:]
    assert "SPARSEVLM_PUBLIC=1)" in log  # started with the image's public-server setting
    assert f"page answers on http://127.0.0.1:{port}/" in log
    assert "API answers:" in log
    expected_user = "uid 1000" if os.getuid() == 0 else f"uid {os.getuid()}"
    assert f"OK: the app answered as {expected_user} with the hub offline" in log
    # It stopped the app: nothing listens on the port any more.
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


LOCAL_CLUTTER = [".venv/bin/python", "venv/lib/site.py", "env/bin/activate", ".env", "app/__pycache__/ui.pyc",
                 "sparsevlm/methods/__pycache__/base.cpython-311.pyc", ".pytest_cache/v/cache", ".ruff_cache/x",
                 ".mypy_cache/3.11/x.json", ".idea/workspace.xml", ".vscode/settings.json",
                 "node_modules/pkg/index.js", "checkpoints/step-100.pt", "sparsevlm_explorer.egg-info/PKG-INFO",
                 "build/lib/sparsevlm/__init__.py", "dist/sparsevlm-0.1.0.whl", "runs/log.txt",
                 "tests/screenshots/01.png", ".benchmarks/x.json", "tests/sub/.venv/bin/python"]


@pytest.mark.parametrize("path", LOCAL_CLUTTER)
def test_local_folders_are_ignored_by_git_and_docker(path):
    docker = read_patterns((ROOT / ".dockerignore").read_text())
    assert excluded(path, docker), f"{path} would be copied into the image"
    git = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT)
    assert git.returncode == 0, f"git would offer {path} for a commit"


def test_the_image_keeps_what_the_app_needs():
    docker = read_patterns((ROOT / ".dockerignore").read_text())
    for path in RUNTIME_FILES:
        assert not excluded(path, docker), path


@pytest.mark.parametrize("patterns,path,is_excluded", [
    ("**/__pycache__", "__pycache__/a.pyc", True),  # `**/` also matches no folder at all
    ("**/__pycache__", "a/b/__pycache__/c.pyc", True),
    ("*.egg-info", "x.egg-info/PKG-INFO", True),  # a parent folder matching excludes the file
    ("*.egg-info", "sub/x.egg-info/PKG-INFO", False),  # patterns are anchored at the top folder
    ("*.md", "README.md", True),
    ("*.md", "docs/app.md", False),
    ("/runs/", "runs/a/b.txt", True),  # leading and trailing slashes are cleaned away
    ("/runs/", "app/runs/b.txt", False),
    ("docs\n!docs/keep.md", "docs/keep.md", False),  # `!` re-includes, the last match decides
    ("docs\n!docs/keep.md", "docs/other.md", True),
    ("!docs/keep.md\ndocs", "docs/keep.md", True),
    ("a?c", "abc", True),
    ("a?c", "a/c", False),  # `?` and `*` stay within one path part
    ("a*", "ab/c", True),
    ("a/**/z", "a/z", True),
    ("a/**/z", "a/b/c/z", True),
    ("**", "anything/at/all", True),
    ("# a comment\n\n  runs  ", "runs/x", True),
    ("file[0-9].txt", "file7.txt", True),
    ("file[0-9].txt", "filex.txt", False),
    ("a.b", "axb", False),  # '.' is a plain character
])
def test_dockerignore_is_read_as_docker_reads_it(patterns, path, is_excluded):
    assert excluded(path, read_patterns(patterns)) is is_excluded


def test_context_copies_untracked_files_and_leaves_out_ignored_ones(tmp_path):
    """Docker sends the folder as it is on disk, git or not: untracked files go in unless .dockerignore names
    them, and a folder left out is left out whole."""
    (tmp_path / ".dockerignore").write_text("**/.venv\nlogs\n!logs/keep.txt\n")
    for rel in ("a.py", "untracked.txt", ".venv/bin/python", "pkg/.venv/x", "logs/x.txt", "logs/keep.txt",
                "pkg/mod.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    (tmp_path / "link.py").symlink_to("a.py")
    assert context_files(tmp_path) == [".dockerignore", "a.py", "link.py", "logs/keep.txt", "pkg/mod.py",
                                       "untracked.txt"]
    from docker_context import copy_context

    dest = tmp_path.parent / "copy"
    assert copy_context(tmp_path, dest) == 6
    assert (dest / "link.py").is_symlink() and (dest / "pkg/mod.py").read_text() == "pkg/mod.py"

"""scripts/check-space.sh: the Docker Space's requirements in a fresh venv, the app started as the image's CMD
starts it, as a non-root user with the hub offline, answering on its port. Docker itself cannot run here.

Marked slow (about a minute: a venv, 64 distributions hard-linked, the app started and stopped); it runs in the
default suite; `-m "not slow"` leaves it out. It uses --reuse, which links this Python's installed packages into
the venv instead of downloading them (no network here; see the script's header for why not
--system-site-packages: this Python lives under /root, which uid 1000 cannot read)."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_check_space_script_serves_the_app_as_non_root_offline():
    port = _free_port()
    out = subprocess.run(["bash", "scripts/check-space.sh", "--reuse", "--port", str(port)], cwd=ROOT,
                         capture_output=True, text=True, timeout=900, env={**os.environ, "PORT": str(port)})
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert "docker cannot run on this machine" in log or "a docker daemon answers here" in log
    assert "No broken requirements found" in log  # pip check in the fresh venv
    assert f"page answers on http://127.0.0.1:{port}/" in log
    assert "API answers:" in log
    expected_user = "uid 1000" if os.getuid() == 0 else f"uid {os.getuid()}"
    assert f"OK: the app answered as {expected_user} with the hub offline" in log
    # It stopped the app: nothing listens on the port any more.
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0

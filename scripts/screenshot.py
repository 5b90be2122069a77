"""Take the README's picture of the app: start `python -m app` on the embedded model, click the first one-click
example in headless Chromium, wait for the run, and save the page to docs/app.png.

    python scripts/screenshot.py                  # writes docs/app.png and docs/app.png.sources
    python scripts/screenshot.py --out /tmp/a.png --port 7870

docs/app.png.sources records a digest of the app's source files; tests/test_docs.py fails when the app's code
has changed since the picture was taken, so the picture is retaken whenever the page may have changed.
Needs chromium and chromedriver (bash scripts/setup-tests.sh installs them).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APP_SOURCES = ("app", "assets/examples")  # what the page is made of, beside the engine it calls
WIDTH, HEIGHT = 1400, 1250


def sources_digest(root: Path = ROOT) -> str:
    """sha256 over the app's source files (path and content, in path order): what the picture was taken from."""
    h = hashlib.sha256()
    for top in APP_SOURCES:
        for p in sorted((root / top).rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts:
                h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float = 180.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"the app did not answer at {url} within {timeout:.0f} s")


def take(url: str, out: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={WIDTH},{HEIGHT}", "--hide-scrollbars"):
        opts.add_argument(arg)
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    drv = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=opts)
    try:
        drv.get(url)
        wait = WebDriverWait(drv, 180, poll_frequency=0.25)
        cells = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#sv-examples td, #sv-examples button"))
        cells[0].click()
        wait.until(lambda d: "sv-badge" in d.find_element(By.ID, "sv-answer").get_attribute("innerHTML"))
        wait.until(lambda d: "visual tokens" in d.find_element(By.ID, "sv-caption").text)
        drv.execute_script("window.scrollTo(0, 0)")  # the page from its title, as a visitor first sees it
        time.sleep(1.5)  # let the overlay and charts finish drawing
        out.parent.mkdir(parents=True, exist_ok=True)
        drv.save_screenshot(str(out))
    finally:
        drv.quit()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "docs" / "app.png"))
    p.add_argument("--port", type=int, default=0, help="port for the app (default: a free one)")
    args = p.parse_args(argv)
    port = args.port or free_port()
    env = {**os.environ, "PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    app = subprocess.Popen([sys.executable, "-m", "app", "--port", str(port)], cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/")
        out = Path(args.out)
        take(f"http://127.0.0.1:{port}/", out)
    finally:
        app.terminate()
        try:
            app.wait(timeout=30)
        except subprocess.TimeoutExpired:
            app.kill()
    Path(f"{out}.sources").write_text(sources_digest() + "\n")
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB) and {out}.sources")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The docs hold what they promise: a short README with the commands CI runs, links that resolve inside the
repository, a screenshot taken from the app as its code stands, and no file that points outside the repository or
tells its development history instead of what the code does."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))

# What a file of this repository must not say: references to files outside it, and development history (who
# worked on what, when, in which numbered work period or ticket); `git log` holds the history. The words are
# spelled in pieces so that a plain grep of the tree for them finds real uses only.
SES, ISS, ENG, COM = "sess" + "ion", "iss" + "ue", "engin" + "eer", "com" + "mit"
FORBIDDEN = [
    r"\.\./shared", r"\bSPEC\.md\b", r"\bMETHODS\.md\b", r"\bSPEC sections?\b", r"\bseeds/0\d",
    rf"\b{SES}s? \d", rf"\b{SES}-\d", rf"\b{ISS}s? #?\d", rf"\b{ENG}s?\b", rf"\b{COM}s? [0-9a-f]{{7}}",
]
TEXT_SUFFIXES = {".py", ".md", ".sh", ".txt", ".toml", ".cfg", ".json", ".jinja", ".yml", ".yaml", ""}


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        files = [ROOT / line for line in out.splitlines()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an unpacked copy)
        skip = {".git", "checkpoints", "runs", "__pycache__", ".pytest_cache", ".ruff_cache"}
        files = [p for p in ROOT.rglob("*") if not skip & set(p.relative_to(ROOT).parts)]
    return [p for p in files if p.is_file() and p.suffix in TEXT_SUFFIXES and p.stat().st_size < 2_000_000]


def test_readme_is_short_and_opens_with_the_commands_ci_runs():
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/setup-tests.sh && python -m pytest -q" in ci
    commands = re.search(r"```bash\n(.*?)```", text, re.S).group(1).splitlines()
    assert commands[0].startswith("python -m pip install -r requirements.txt && python -m app ")
    assert commands[1].startswith("bash scripts/setup-tests.sh && python -m pytest -q ")
    assert "has not yet been run on a GPU" in text


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: p.name)
def test_every_relative_link_resolves_inside_the_repository(doc):
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (doc.parent / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT), f"{doc.name} links outside the repository: {target}"
        assert path.exists(), f"{doc.name} links to a missing file: {target}"


def test_no_file_points_outside_the_repository_or_tells_history():
    pattern = re.compile("|".join(FORBIDDEN), re.I)
    found = []
    for path in tracked_files():
        if path == Path(__file__).resolve():
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if m := pattern.search(line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {m.group(0)!r} in {line.strip()[:100]}")
    assert not found, "\n".join(found)


def test_the_forbidden_patterns_catch_what_they_are_for():
    pattern = re.compile("|".join(FORBIDDEN), re.I)
    for bad in ("see ../shared/SPEC.md", "SPEC section 4", f"as in {SES} 10", f"{SES.title()} 7:", f"{ISS} 10's bars",
                f"the lead {ENG}", f"at {COM} f11d41f", "FasterVLM (seeds/004)"):
        assert pattern.search(bad), bad
    for fine in (f"each browser {SES} keeps its model", f"{COM} in small steps", f"an {ISS} with the hub"):
        assert not pattern.search(fine), fine


def test_the_screenshot_was_taken_from_the_app_as_it_is():
    """docs/app.png is retaken (python scripts/screenshot.py) whenever the app's code or examples change."""
    spec = importlib.util.spec_from_file_location("screenshot", ROOT / "scripts" / "screenshot.py")
    shot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shot)
    png = ROOT / "docs" / "app.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    recorded = (ROOT / "docs" / "app.png.sources").read_text().strip()
    assert recorded == shot.sources_digest(), (
        "the app changed since docs/app.png was taken: run python scripts/screenshot.py and commit both files")

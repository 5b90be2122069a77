"""The layout's one rule: the engine (`sparsevlm/`) and the app (`app/`) never import the training package.

`training/` trains and measures the embedded model; nothing of it may run when the app or the engine runs, and the
Docker image leaves it out (.dockerignore), so an import of it from a runtime module would fail in the image.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ("sparsevlm", "app")


def imported_modules(source: str, module: str) -> set[str]:
    """Every module a source file imports, relative imports resolved against `module` (its dotted name), at any
    depth of the file (imports inside functions count too)."""
    package = module.split(".")[:-1]  # a module's package; for "pkg.__init__" the package itself
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)  # `from x import y` may import module x.y
    return out


def runtime_files() -> list[Path]:
    return sorted(p for top in RUNTIME for p in (ROOT / top).rglob("*.py")) + [ROOT / "space_app.py"]


def dotted(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def is_training(name: str) -> bool:
    return name == "training" or name.startswith("training.")


def test_the_scanner_sees_every_form_of_import():
    src = ("import training\nimport os, training.likeness as L\nfrom training import parts\n"
           "def f():\n    from training.model_card import card\n")
    assert {"training", "training.likeness", "training.model_card"} <= imported_modules(src, "sparsevlm.x")
    # relative imports resolve inside their own package: sparsevlm.scenes.worlds' `from . import world`
    assert "sparsevlm.scenes.world" in imported_modules("from . import world\n", "sparsevlm.scenes.worlds")
    assert "sparsevlm.tokenizer" in imported_modules("from ..tokenizer import x\n", "sparsevlm.scenes.model")
    assert not any(map(is_training, imported_modules("import trainingwheels\nfrom sparsevlm import training_x\n",
                                                     "app.ui")))


@pytest.mark.parametrize("path", runtime_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_runtime_modules_never_import_training(path):
    bad = sorted(n for n in imported_modules(path.read_text(), dotted(path)) if is_training(n))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}: the engine and the app must run without training/"


def test_training_is_its_own_top_level_package_and_stays_out_of_the_image():
    assert (ROOT / "training" / "__init__.py").is_file()
    assert not (ROOT / "sparsevlm" / "training").exists()
    ignored = [line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()]
    assert "training" in ignored

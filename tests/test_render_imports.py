"""The renderers only draw a recorded trace: importing any of them, each in a fresh interpreter, loads neither torch
nor the engine's request path (pipeline, hooks) nor the benchmark's runner."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
RENDER_MODULES = ["captions", "export", "figures", "geometry", "layers", "overlays", "tables", "truth", "words"]
RENDERERS = ["app.render", *(f"app.render.{m}" for m in RENDER_MODULES), "app.profile_view", "app.model_note"]
ENGINE = ["torch", "sparsevlm.pipeline", "sparsevlm.hooks", "sparsevlm.evaluation.runner", "sparsevlm.evaluate"]


def test_every_module_of_the_render_package_is_checked():
    found = sorted(p.stem for p in (ROOT / "app" / "render").glob("*.py") if p.stem != "__init__")
    assert found == RENDER_MODULES


@pytest.mark.parametrize("module", RENDERERS)
def test_a_renderer_loads_no_torch_no_pipeline_and_no_runner(module):
    code = (f"import importlib, json, sys; importlib.import_module({module!r}); "
            f"print(json.dumps([m for m in {ENGINE!r} if m in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [], f"importing {module} loaded {done.stdout.strip()}"

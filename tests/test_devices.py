"""Every tensor the engine builds to combine with the model's tensors is built on their device.

The engine runs on the model's device; a constructor without `device=` makes a CPU tensor, and mixing it with CUDA
tensors fails only on a GPU - which CI does not have. Found on the first run of tests/test_cuda.py on an H100
(DivPrune's mask and VisionZip's index tensors were on the CPU). This test reads the engine's source (sparsevlm/*.py
and sparsevlm/methods/*.py; sparsevlm/scenes/ draws pictures with NumPy and PIL and builds no tensor, and the
training code in training/ never runs with the engine): each torch constructor must name a device, or be listed
below with the reason it may stay on the CPU.
"""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parent.parent / "sparsevlm"
CONSTRUCTORS = {"zeros", "ones", "full", "empty", "arange", "tensor", "as_tensor", "randperm", "rand", "randn",
                "randint", "eye", "linspace", "Generator"}
# (file relative to sparsevlm/, constructor, a piece of its line): why it may be a CPU tensor
ALLOWED = {
    ("methods/dart.py", "tensor", "local = torch.tensor(sorted("):
        "Selection.kept: the hooks move it (`sel.kept.to(dev)`)",
    ("methods/divprune.py", "tensor", "kept=torch.tensor(sorted(order)"): "Selection.kept: moved by the hooks",
    ("methods/sparsevlm.py", "arange", "return Selection(torch.arange(v)"): "Selection.kept: moved by the hooks",
    ("methods/sparsevlm.py", "Generator", "gen = torch.Generator().manual_seed("):
        "seeds algorithm.density_peak_clusters' tie noise, drawn on the CPU (device='cpu') and then moved",
    ("methods/random_subset.py", "rand", "torch.rand(inp.visual, generator=torch.Generator()"):
        "drawn with a seeded CPU generator (same draw on every device), then `.to(inp.hidden.device)`",
    ("methods/random_subset.py", "Generator", "torch.rand(inp.visual, generator=torch.Generator()"):
        "the seeded CPU generator of that draw",
    ("methods/sparsevlm_v2.py", "ones", "sign = torch.cat([-torch.ones(hd // 2), torch.ones("):
        "`.to(cos_rows.device, torch.float64)` on the same line",
    ("loading.py", "empty", "per = torch.empty((), dtype=dtype).element_size()"):
        "a 0-d tensor read only for its dtype's element size; never meets the model",
}


def _deviceless_constructors() -> list[tuple[str, str, str]]:
    found = []
    for path in sorted([*ENGINE.glob("*.py"), *ENGINE.glob("methods/*.py")]):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in CONSTRUCTORS and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "torch" and not any(k.arg == "device" for k in node.keywords)):
                found.append((path.relative_to(ENGINE).as_posix(), node.func.attr, lines[node.lineno - 1].strip()))
    return found


def test_engine_tensors_are_built_on_the_models_device():
    unexplained = [f"{f}: torch.{c} in `{line}`" for f, c, line in _deviceless_constructors()
                   if not any(f == af and c == ac and piece in line for af, ac, piece in ALLOWED)]
    assert not unexplained, "torch constructors without device= (add device=..., or a reason to ALLOWED):\n" + \
        "\n".join(unexplained)


def test_every_allowed_exception_still_exists():
    found = _deviceless_constructors()
    stale = [k for k in ALLOWED if not any(f == k[0] and c == k[1] and k[2] in line for f, c, line in found)]
    assert not stale, f"ALLOWED entries that match nothing (remove them): {stale}"


def test_scene_drawing_builds_no_tensor():
    """What the docstring above says of sparsevlm/scenes/: it never imports torch, so it has no constructor to check."""
    users = [p.name for p in sorted(ENGINE.glob("scenes/*.py")) if "torch" in p.read_text()]
    assert users == []

"""Every tensor a pruning method builds to combine with the model's tensors is built on their device.

The methods run on the model's device; a constructor without `device=` makes a CPU tensor, and mixing it with CUDA
tensors fails only on a GPU - which CI does not have. Found on the first run of tests/test_cuda.py on an H100
(DivPrune's mask and VisionZip's index tensors were on the CPU). This test reads the methods' source: each torch
constructor must name a device, or be listed below with the reason it may stay on the CPU.
"""

from __future__ import annotations

import ast
from pathlib import Path

METHODS_DIR = Path(__file__).resolve().parent.parent / "sparsevlm" / "methods"
CONSTRUCTORS = {"zeros", "ones", "full", "empty", "arange", "tensor", "randperm", "rand", "randn", "eye", "linspace"}
# (file, constructor, a piece of its line): why it may be a CPU tensor
ALLOWED = {
    ("dart.py", "tensor", "local = torch.tensor(sorted("): "Selection.keep: the hooks move it (`sel.keep.to(dev)`)",
    ("divprune.py", "tensor", "kept=torch.tensor(sorted(order)"): "Selection.keep: moved by the hooks",
    ("sparsevlm.py", "arange", "return Selection(torch.arange(v)"): "Selection.keep: moved by the hooks",
    ("random_subset.py", "rand", "torch.rand(inp.visual, generator=torch.Generator()"):
        "drawn with a seeded CPU generator (same draw on every device), then `.to(inp.hidden.device)`",
    ("sparsevlm_v2.py", "ones", "sign = torch.cat([-torch.ones(hd // 2), torch.ones("):
        "`.to(cos_rows.device, torch.float64)` on the same line",
}


def _deviceless_constructors() -> list[tuple[str, str, str]]:
    found = []
    for path in sorted(METHODS_DIR.glob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in CONSTRUCTORS and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "torch" and not any(k.arg == "device" for k in node.keywords)):
                found.append((path.name, node.func.attr, lines[node.lineno - 1].strip()))
    return found


def test_method_tensors_are_built_on_the_models_device():
    unexplained = [f"{f}: torch.{c} in `{line}`" for f, c, line in _deviceless_constructors()
                   if not any(f == af and c == ac and piece in line for af, ac, piece in ALLOWED)]
    assert not unexplained, "torch constructors without device= (add device=..., or a reason to ALLOWED):\n" + \
        "\n".join(unexplained)


def test_every_allowed_exception_still_exists():
    found = _deviceless_constructors()
    stale = [k for k in ALLOWED if not any(f == k[0] and c == k[1] and k[2] in line for f, c, line in found)]
    assert not stale, f"ALLOWED entries that match nothing (remove them): {stale}"

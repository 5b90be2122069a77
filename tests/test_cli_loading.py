"""The command line as a user scripts it, and model loading from folders and (offline) hub ids.

The commands run in-process through `sparsevlm.cli.main` (what `python -m sparsevlm` calls), with stdout and
stderr captured, so each does not pay for a new interpreter importing torch; one test runs the real entry point
in a subprocess.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sparsevlm.cli import main
from sparsevlm.errors import ModelLoadError
from sparsevlm.loading import load_model
from sparsevlm.testing import tiny_llava

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m sparsevlm ARGS` in this process: exit code, stdout and stderr as a subprocess would give them."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's errors exit
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(["python", "-m", "sparsevlm", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model, processor = tiny_llava(request.param, layers=8, image_size=112)
    model.save_pretrained(d)
    processor.save_pretrained(d)
    return request.param, d


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (90, 140, 3), dtype=np.uint8)).save(p)
    return p


def test_load_model_from_folder(model_dir):
    arch, d = model_dir
    lm = load_model(str(d))
    assert lm.arch == f"llava-{arch}"
    assert lm.grid == (8, 8) and lm.visual_tokens == 64
    assert lm.has_cls == (arch == "llama")
    assert lm.model.config.text_config._attn_implementation == "sdpa"
    assert str(lm.device) == "cpu" and str(lm.dtype) == "torch.float32"


def test_offline_hub_id_fails_fast_with_clear_message():
    with pytest.raises(ModelLoadError, match="cannot download 'llava-hf/llava-1.5-7b-hf'"):
        load_model("llava-hf/llava-1.5-7b-hf")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("./no/such/folder")


@pytest.mark.parametrize("method", ["sparsevlm", "fastv", "random", "dense"])
def test_cli_run_json(model_dir, image_file, method):
    _, d = model_dir
    r = cli("run", "--model", str(d), "--image", str(image_file), "--question", "what colour is the shape?",
            "--method", method, "--budget", "32", "--max-new-tokens", "3", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("answer", "method", "equal_tokens", "layers", "raters", "timings_ms", "cost"):
        assert key in out
    assert out["method"] == method
    assert len(out["layers"]) == 8
    assert set(out["layers"][0]) >= {"layer", "visual_in", "visual_out", "rank", "deleted", "recycled", "clusters"}
    assert set(out["timings_ms"]) >= {"vision", "prefill", "prune_overhead", "decode_per_token", "total"}
    assert set(out["cost"]) >= {"prefill_flops_dense", "prefill_flops", "kv_bytes_dense", "kv_bytes"}
    if method == "sparsevlm":
        pruning = [row for row in out["layers"] if row["rank"] is not None]
        assert len(pruning) == 3 and all(row["visual_out"] < row["visual_in"] for row in pruning)
        assert any(r["rater"] for r in out["raters"])
        assert out["accounting"] == "paper" and out["budget_counting"] == "output"
        assert out["budget_met"] and abs(out["budget_figure"] - 32) <= 1
        assert out["budget_figure"] == out["equal_tokens_output"]
        assert out["equal_tokens_input"] > out["equal_tokens_output"]  # both figures, always
        assert out["config"]["positions"] == "compact"  # v1.5's default
    if method == "dense":
        assert out["equal_tokens"] == 64 and out["cost"]["prefill_flops"] == out["cost"]["prefill_flops_dense"]


@pytest.mark.parametrize("method,counting,positions", [
    ("sparsevlm-v2", "output", "keep"), ("visionzip", "input", "compact"), ("divprune", "input", "compact"),
    ("pyramiddrop", "input", "compact"), ("dart", "retained", "keep"),
])
def test_cli_runs_the_newer_methods(model_dir, image_file, method, counting, positions):
    arch, d = model_dir
    r = cli("run", "--model", str(d), "--image", str(image_file), "--question", "what colour is the shape?",
            "--method", method, "--budget", "32", "--max-new-tokens", "2", "--json")
    if method == "visionzip" and arch == "qwen2":  # SigLIP: no [CLS] to rank by; one line, no traceback
        assert r.returncode != 0 and "Traceback" not in r.stderr and "[CLS]" in r.stderr
        return
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["method"] == method and out["config"]["positions"] == positions
    assert out["accounting"] == "paper" and out["budget_counting"] == counting and out["budget_met"]
    assert {"equal_tokens_input", "equal_tokens_output"} <= set(out)


def test_cli_run_flops_accounting(model_dir, image_file):
    _, d = model_dir
    r = cli("run", "--model", str(d), "--image", str(image_file), "--question", "what colour is the shape?",
            "--method", "fastv", "--budget", "32", "--accounting", "flops", "--max-new-tokens", "2", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["accounting"] == "flops" and out["budget_counting"] == "input" and out["budget_met"]
    assert abs(out["equal_tokens_input"] - 32) <= 1 and out["equal_tokens_output"] < out["equal_tokens_input"]
    r = cli("run", "--model", str(d), "--image", str(image_file), "--question", "q", "--method", "fastv",
            "--budget", "4", "--accounting", "flops")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "below what pruning after layer" in r.stderr


def test_cli_cost_anchors():
    r = cli("cost", "--preset", "llava-1.5-7b", "--visual-tokens", "576", "--text-tokens", "34", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["visual_kv_bytes"] == 288 * 2**20
    assert abs(out["prefill_flops"] / 8.0e12 - 1) < 0.05


@pytest.mark.parametrize(
    "args,message",
    [
        (["run", "--image", "missing.png", "--question", "q"], "not found"),
        (["run", "--image", str(ROOT / "requirements.txt"), "--question", "q"], "not an image"),
        (["run", "--image", "IMG", "--question", "q", "--method", "magic"], "invalid choice"),
        (["run", "--image", "IMG", "--question", "q", "--budget", "0"], "at least 1"),
        (["run", "--image", "IMG", "--question", "   "], "question is empty"),
        (["run", "--image", "IMG", "--question", "q", "--budget", "500", "--model", "MODEL"],
         "larger than the image grid"),
        (["cost", "--preset", "gpt-9"], "unknown preset"),
    ],
)
def test_cli_bad_arguments_one_line_no_traceback(args, message, image_file, model_dir):
    args = [str(image_file) if a == "IMG" else str(model_dir[1]) if a == "MODEL" else a for a in args]
    r = cli(*args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_the_entry_point_runs_in_its_own_process():
    """`python -m sparsevlm` itself: JSON on stdout with exit code 0, and an error as one line with exit code 2."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ok = subprocess.run([sys.executable, "-m", "sparsevlm", "cost", "--preset", "llava-1.5-7b", "--json"],
                        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["visual_kv_bytes"] == 288 * 2**20
    bad = subprocess.run([sys.executable, "-m", "sparsevlm", "run", "--image", "missing.png", "--question", "q"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert [line for line in bad.stderr.splitlines() if line.strip()] == ["error: image file not found: missing.png"]

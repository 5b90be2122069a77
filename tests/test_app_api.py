"""The app's named endpoints, driven with gradio_client against a real server (`python -m app`) on a tiny model.

Bad inputs must come back as clear messages and leave the server up; concurrent clients must never see each
other's traces.
"""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from sparsevlm.methods import METHOD_LABELS, METHODS
from sparsevlm.trace import PruneTrace

REPO = Path(__file__).resolve().parent.parent
TINY_IMAGE = 168  # 12x12 = 144 visual tokens: budgets 64..128 fit, 192 does not
CONTEXT = 320  # small context so an over-long question can be tested without a huge prompt


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scene(size=(640, 480), colour=(220, 40, 40)) -> Image.Image:
    img = Image.new("RGB", size, (235, 238, 242))
    d = ImageDraw.Draw(img)
    w, h = size
    d.ellipse((w * 0.15, h * 0.2, w * 0.45, h * 0.2 + w * 0.3), fill=colour)
    d.rectangle((w * 0.55, h * 0.5, w * 0.85, h * 0.5 + w * 0.3), fill=(40, 80, 220))
    return img


def make_assets(root: Path) -> tuple[Path, Path]:
    """A saved tiny LLaVA folder and an examples.json with PNGs, as the app's --model / --examples."""
    from sparsevlm.testing import tiny_llava

    model_dir = root / "tiny-llava"
    model, processor = tiny_llava("llama", image_size=TINY_IMAGE)
    model.config.text_config.max_position_embeddings = CONTEXT
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    ex_dir = root / "examples"
    ex_dir.mkdir()
    items = []
    for name, size, q in (("circle.png", (640, 480), "what colour is the circle ?"),
                          ("tall.png", (360, 600), "is there a square ?")):
        scene(size).save(ex_dir / name)
        items.append({"image": name, "question": q, "answer": "red", "family": "colour"})
    (ex_dir / "examples.json").write_text(json.dumps(items))
    return model_dir, ex_dir / "examples.json"


class AppServer:
    """`python -m app` in a subprocess on a free port; stopped by its own pid."""

    def __init__(self, root: Path):
        self.model_dir, self.examples = make_assets(root)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = root / "server.log"
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app", "--model", str(self.model_dir), "--examples", str(self.examples),
             "--port", str(self.port)],
            cwd=REPO, env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app exited early:\n{self.log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(self.url, timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"app did not start in time:\n{self.log.read_text()[-3000:]}")

    def alive(self) -> bool:
        try:
            return self.proc.poll() is None and urllib.request.urlopen(self.url, timeout=5).status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = AppServer(tmp_path_factory.mktemp("app"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return Client(server.url, verbose=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("inputs")
    out = {}

    def save(name: str, img: Image.Image, fmt: str | None = None, **kw) -> None:
        img.save(d / name, format=fmt, **kw)
        out[name] = d / name

    base = scene()
    save("rgb.png", base)
    save("gray.png", base.convert("L"))
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    save("rgba.png", rgba)
    save("palette.png", base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16))
    save("cmyk.jpg", base.convert("CMYK"), "JPEG")
    save("gray16.png", Image.fromarray(__import__("numpy").asarray(base.convert("L"), dtype="uint16") * 200))
    exif = Image.Exif()
    exif[0x0112] = 6
    save("exif.jpg", base, "JPEG", exif=exif.tobytes())
    frames = [scene(colour=c) for c in ((220, 40, 40), (40, 200, 40))]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    out["anim.gif"] = d / "anim.gif"
    (d / "text.png").write_text("definitely not a picture\n")
    out["text.png"] = d / "text.png"
    buf = io.BytesIO()
    Image.effect_noise((400, 400), 50).convert("RGB").save(buf, "PNG")
    (d / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    out["truncated.png"] = d / "truncated.png"
    (d / "bomb.png").write_bytes(_bomb_png(40_000, 40_000))
    out["bomb.png"] = d / "bomb.png"
    (d / "wide.png").write_bytes(_bomb_png(30_000, 8))
    out["wide.png"] = d / "wide.png"
    return out


def _bomb_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    data = zlib.compress((b"\x00" * (1 + (width + 7) // 8)) * 16, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def explain(client: Client, image, question="what colour is the circle ?", method="sparsevlm", budget=64,
            count_mode="fixed", lam=1.0, scale=13.5, bias=0.0, recycle=True, max_new_tokens=4, view="tokens"):
    img = handle_file(str(image)) if image is not None else None
    return client.predict(img, question, method, budget, count_mode, lam, scale, bias, recycle, max_new_tokens, view,
                          api_name="/explain")


# --- the happy path ------------------------------------------------------------------------------------------
def test_api_lists_named_endpoints(client):
    names = set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
    assert {"/explain", "/compare", "/export", "/layer_view"} <= names


def test_explain_returns_every_view(client, files):
    out = explain(client, files["rgb.png"])
    answer, raters, rater_note, raters_fig, overlay, slider, caption, counts, formulas, latency, lat_fig, summary = out
    assert "SparseVLM" in answer and "Dense" in answer and ("same answer" in answer or "differs" in answer)
    assert raters and all(-1 <= r["class_or_confidence"] <= 1 for r in raters)
    assert any(r["class_or_confidence"] > 0 for r in raters) and "raters" in rater_note
    assert raters_fig["type"] == "plotly" and "mean R" in raters_fig["plot"]
    ov = Image.open(overlay)
    assert ov.size == (512, 384)  # the upload's 4:3 aspect, not the model's square
    assert slider["maximum"] == 7 and 0 <= slider["value"] <= 7
    assert "visual tokens" in caption
    assert counts["type"] == "plotly" and "rank(P)" in counts["plot"]
    assert formulas.count("fixed budget 64") >= 1
    kinds = {row[-1] for row in latency["data"]}
    assert kinds == {"measured", "computed"}
    assert all(row[4] for row in latency["data"])  # every row has a unit
    assert "measured" in lat_fig["plot"] and "computed" in lat_fig["plot"]
    assert summary["pruned"]["method"] == "sparsevlm" and summary["dense"]["method"] == "dense"
    # paper accounting (the default): the reference's output counting meets the budget; both figures reported
    assert summary["pruned"]["budget_figure"] == pytest.approx(64, abs=1) and summary["pruned"]["budget_met"]
    assert summary["pruned"]["equal_tokens_output"] == summary["pruned"]["budget_figure"]
    assert summary["pruned"]["equal_tokens_input"] > summary["pruned"]["equal_tokens_output"]


@pytest.mark.parametrize("method", ["fastv", "fastervlm", "random", "dense"])
def test_every_method_runs(client, files, method):
    out = explain(client, files["rgb.png"], method=method, max_new_tokens=2)
    assert out[-1]["pruned"]["method"] == method


def test_adaptive_modes(client, files):
    out = explain(client, files["rgb.png"], count_mode="paper", lam=0.5)
    assert "eq. 8" in out[8] or "λ" in out[8] or "lambda" in out[8].lower()
    out = explain(client, files["rgb.png"], count_mode="code", scale=2.0, bias=1.0, recycle=False)
    assert out[-1]["pruned"]["config"]["recycle"] is False


def test_layer_view_and_export_use_the_session(server, files):
    c = Client(server.url, verbose=False)
    explain(c, files["rgb.png"])
    overlay, caption = c.predict(0, "heatmap", api_name="/layer_view")
    assert Image.open(overlay).size == (512, 384) and "layer 0" in caption
    downloads, gif = c.predict(api_name="/export")
    names = [Path(p).name for p in downloads]
    assert any(n.startswith("trace-sparsevlm") for n in names)
    trace = PruneTrace.from_json(Path(next(p for p in downloads if "trace-sparsevlm" in p)).read_text())
    assert trace.method == "sparsevlm" and trace.stages
    anim = Image.open(gif)
    assert anim.format == "GIF" and anim.n_frames == 8


def test_compare_runs_every_method(client, files):
    gallery, table = client.predict(handle_file(str(files["rgb.png"])), "what colour is the circle ?", 64, 2,
                                    api_name="/compare")
    methods = [row[0] for row in table["data"]]
    assert len(methods) == len(METHODS) and methods[0].startswith("Dense")  # the grid follows the registry
    for name in ("sparsevlm-v2", "visionzip", "divprune", "pyramiddrop", "dart"):
        assert METHOD_LABELS[name] in methods
    assert len(gallery) == len(METHODS) and all("eq. tokens" in g["caption"] for g in gallery)


# --- bad inputs: a clear message, and the server stays up --------------------------------------------------
@pytest.mark.parametrize(
    "name,needle",
    [
        ("text.png", "not an image"),
        ("truncated.png", "corrupt or truncated"),
        ("bomb.png", "decompression bomb"),
        ("wide.png", "longest side"),
    ],
)
def test_bad_images_give_clear_messages(client, server, files, name, needle):
    with pytest.raises(AppError, match=needle):
        explain(client, files[name])
    assert server.alive()


def test_no_image(client, server):
    with pytest.raises(AppError, match="no image"):
        explain(client, None)
    assert server.alive()


@pytest.mark.parametrize("name", ["gray.png", "rgba.png", "palette.png", "cmyk.jpg", "gray16.png", "anim.gif"])
def test_unusual_modes_are_converted(client, files, name):
    out = explain(client, files[name], max_new_tokens=1)
    assert Image.open(out[4]).size == (512, 384)


def test_exif_rotation_is_honoured(client, files):
    out = explain(client, files["exif.jpg"], max_new_tokens=1)
    assert Image.open(out[4]).size == (384, 512)  # stored 640x480, displayed rotated to 480x640
    assert out[-1]["pruned"]["model"]  # a real run happened


@pytest.mark.parametrize("question,needle", [("", "empty"), ("   \n\t ", "empty")])
def test_empty_question(client, server, files, question, needle):
    with pytest.raises(AppError, match=needle):
        explain(client, files["rgb.png"], question=question)
    assert server.alive()


def test_question_longer_than_context(client, server, files):
    long_q = " ".join(["red"] * 300) + " ?"  # 300 words + 144 image tokens > context 320
    with pytest.raises(AppError, match="context"):
        explain(client, files["rgb.png"], question=long_q)
    with pytest.raises(AppError, match="characters"):
        explain(client, files["rgb.png"], question="red " * 1000)
    assert server.alive()


def test_budget_above_grid(client, server, files):
    with pytest.raises(AppError, match="larger than the image grid"):
        explain(client, files["rgb.png"], budget=192)
    assert server.alive()


# --- concurrency ---------------------------------------------------------------------------------------------
def test_concurrent_users_get_their_own_traces(server, files, tmp_path):
    """Two sessions at once, different questions and methods: each gets back exactly its own run."""
    jobs = {
        "a": ("what colour is the circle ?", "sparsevlm"),
        "b": ("is there a square ?", "fastv"),
        "c": ("how many shapes are there ?", "random"),
    }
    results: dict[str, object] = {}
    exports: dict[str, object] = {}

    def user(key: str) -> None:
        q, m = jobs[key]
        c = Client(server.url, verbose=False)
        results[key] = explain(c, files["rgb.png"], question=q, method=m, max_new_tokens=2)
        exports[key] = c.predict(api_name="/export")

    threads = [threading.Thread(target=user, args=(k,)) for k in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert set(results) == set(jobs)
    for key, (q, m) in jobs.items():
        summary = results[key][-1]["pruned"]
        assert summary["method"] == m
        downloads, _ = exports[key]
        trace = PruneTrace.from_json(Path(next(p for p in downloads if f"trace-{m}" in p)).read_text())
        assert trace.question == " ".join(q.split()) and trace.method == m


# --- start-up ------------------------------------------------------------------------------------------------
def test_missing_model_folder_fails_clearly(tmp_path):
    env = {**os.environ, "SPARSEVLM_MODEL": str(tmp_path / "no-such-model")}
    proc = subprocess.run([sys.executable, "-m", "app", "--port", str(free_port())], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr

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

import numpy as np
import pytest
from PIL import Image, ImageDraw

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from sparsevlm.methods import METHODS
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


def save_tiny(folder: Path, arch: str) -> int:
    """A tiny LLaVA saved as a model folder; returns the bytes its weights take."""
    from sparsevlm.loading import model_bytes
    from sparsevlm.testing import tiny_llava

    model, processor = tiny_llava(arch, image_size=TINY_IMAGE)
    model.config.text_config.max_position_embeddings = CONTEXT
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model_bytes(model)


def make_assets(root: Path) -> tuple[Path, Path, Path, int]:
    """Two saved tiny LLaVA folders (CLIP+Llama, the default; SigLIP+Qwen2, for the picker), an examples.json
    with PNGs, and a model memory budget that holds one of the two models but not both."""
    model_dir = root / "models" / "tiny-llava"
    second_dir = root / "models" / "tiny-qwen"
    budget = int(1.5 * max(save_tiny(model_dir, "llama"), save_tiny(second_dir, "qwen2")))
    ex_dir = root / "examples"
    ex_dir.mkdir()
    items = []
    for name, size, q in (("circle.png", (640, 480), "what colour is the circle ?"),
                          ("tall.png", (360, 600), "is there a square ?")):
        scene(size).save(ex_dir / name)
        # the evidence of a generated scene: here the crop's top-left 2x2 patches
        items.append({"image": name, "question": q, "answer": "red", "family": "colour", "evidence": [0, 1, 12, 13]})
    (ex_dir / "examples.json").write_text(json.dumps(items))
    return model_dir, second_dir, ex_dir / "examples.json", budget


class AppServer:
    """`python -m app` in a subprocess on a free port; stopped by its own pid."""

    def __init__(self, root: Path, memory_gib: float | None = None):
        """`memory_gib`: the model memory budget (default: one of the two tiny models, not both)."""
        self.model_dir, self.second_model_dir, self.examples, budget = make_assets(root)
        budget = budget if memory_gib is None else int(memory_gib * 2**30)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = root / "server.log"
        # The hub is offline (as on the Space); the tiny models are the "models available locally".
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
               "SPARSEVLM_MODELS_DIR": str(self.model_dir.parent)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app", "--model", str(self.model_dir), "--examples", str(self.examples),
             "--port", str(self.port), "--model-memory-gib", str(budget / 2**30)],
            cwd=REPO, env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.time() + 600  # a busy machine can take minutes to import torch and gradio
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
    save("gray16.png", Image.fromarray(np.asarray(base.convert("L"), dtype="uint16") * 200))
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


def html_table(page: str) -> tuple[list[str], list[list[str]]]:
    """(headers, rows of cell texts) of the first HTML table in a page fragment."""
    from html.parser import HTMLParser

    class Cells(HTMLParser):
        def __init__(self):
            super().__init__()
            self.rows: list[list[str]] = []
            self.cell: list[str] | None = None
            self.done = False

        def handle_starttag(self, tag, attrs):
            if self.done:
                return
            if tag == "tr":
                self.rows.append([])
            elif tag in ("td", "th"):
                self.cell = []

        def handle_endtag(self, tag):
            if tag in ("td", "th") and self.cell is not None and not self.done:
                self.rows[-1].append("".join(self.cell).strip())
                self.cell = None
            self.done = self.done or tag == "table"

        def handle_data(self, data):
            if self.cell is not None:
                self.cell.append(data)

    p = Cells()
    p.feed(page)
    return p.rows[0], p.rows[1:]


def explain(client: Client, image, question="what colour is the circle ?", max_new_tokens=4, **kw):
    """/explain by parameter name; what is left out takes the page's defaults."""
    img = handle_file(str(image)) if image is not None else None
    return client.predict(image=img, question=question, max_new_tokens=max_new_tokens, api_name="/explain", **kw)


# --- the happy path ------------------------------------------------------------------------------------------
def test_api_lists_named_endpoints(client):
    names = set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
    assert {"/run", "/compare", "/explain", "/compare_view", "/export", "/layer_view"} <= names


def test_explain_returns_every_view(client, files):
    out = explain(client, files["rgb.png"])
    (answer, raters, rater_note, raters_fig, overlay, slider, caption, counts, formulas, latency, lat_fig,
     count_compare, mass_curve, probes, notice, record) = out
    assert notice == ""  # the tiny model knows every word of this question
    for view in (count_compare, mass_curve, probes):  # ZipVL's views: hidden for SparseVLM
        assert view["visible"] is False and not view["value"]
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
    headers, rows = html_table(latency)
    assert headers[-2:] == ["unit", "how obtained"]
    assert {row[-1] for row in rows} == {"measured", "computed"}
    assert all(row[4] for row in rows)  # every row has a unit
    assert "measured" in lat_fig["plot"] and "computed" in lat_fig["plot"]
    assert record["trace"]["method"] == "sparsevlm" and record["dense_trace"]["method"] == "dense"
    # paper accounting (the default): the reference's output counting meets the budget; both figures reported
    cost = record["trace"]["cost"]
    assert cost["budget_figure"] == pytest.approx(64, abs=1) and cost["budget_met"]
    assert cost["equal_tokens_reference"] == cost["budget_figure"]
    assert cost["equal_tokens"] > cost["equal_tokens_reference"]
    assert record["answer"] == record["trace"]["answer"] and record["dense_answer"] == record["dense_trace"]["answer"]


def test_example_evidence_is_outlined(server, client):
    """A bundled example that knows its evidence patches gets them outlined in white; another question does not."""
    example = json.loads(server.examples.read_text())[0]
    image = server.examples.parent / example["image"]  # 640x480: displayed 512x384, crop x 64..448, 32 px patches
    with_ev = np.asarray(Image.open(explain(client, image, example["question"], max_new_tokens=1)[4]).convert("RGB"))
    without = np.asarray(Image.open(explain(client, image, "is there a square ?", max_new_tokens=1)[4]).convert("RGB"))
    left_edge = (slice(8, 56), slice(63, 66))  # the 2x2 block's left side, x = 64
    white = (255, 255, 255)
    assert (with_ev[left_edge] == white).all(axis=-1).mean() > 0.5
    assert (without[left_edge] == white).all(axis=-1).mean() < 0.1


@pytest.mark.parametrize("method", ["fastv", "fastervlm", "random", "dense"])
def test_every_method_runs(client, files, method):
    out = explain(client, files["rgb.png"], method=method, max_new_tokens=2)
    assert out[-1]["trace"]["method"] == method


def test_adaptive_modes(client, files):
    out = explain(client, files["rgb.png"], count_mode="paper", lam=0.5)
    assert "eq. 8" in out[8] or "λ" in out[8] or "lambda" in out[8].lower()
    out = explain(client, files["rgb.png"], count_mode="code", scale=2.0, bias=1.0, recycle=False)
    assert out[-1]["trace"]["config"]["options"]["recycle"] is False


def test_layer_view_and_export_use_the_session(server, files):
    c = Client(server.url, verbose=False)
    explain(c, files["rgb.png"])
    overlay, caption = c.predict(0, "heatmap", api_name="/layer_view")
    assert Image.open(overlay).size == (512, 384) and "layer 0" in caption
    downloads, gif, mp4 = c.predict(api_name="/export")
    names = [Path(p).name for p in downloads]
    assert any(n.startswith("trace-sparsevlm") for n in names) and any(n.endswith(".mp4") for n in names)
    trace = PruneTrace.from_json(Path(next(p for p in downloads if "trace-sparsevlm" in p)).read_text())
    assert trace.method == "sparsevlm" and trace.stages
    anim = Image.open(gif)
    assert anim.format == "GIF" and anim.n_frames == 8
    video = mp4["video"] if isinstance(mp4, dict) else mp4
    meta, frames = decode_video(video)
    assert meta["codec"].startswith("h264") and len(frames) == 8  # one frame per decoder layer


def decode_video(path) -> tuple[dict, list]:
    """Decode a video back with ffmpeg: its metadata and every frame as an array."""
    import imageio_ffmpeg

    gen = imageio_ffmpeg.read_frames(str(path))
    meta = next(gen)
    w, h = meta["size"]
    frames = [np.frombuffer(f, dtype=np.uint8).reshape(h, w, 3) for f in gen]
    return meta, frames


def test_compare_view_runs_every_method(client, files):
    gallery, table, data = client.predict(handle_file(str(files["rgb.png"])), "what colour is the circle ?", 64, 2,
                                          api_name="/compare_view")
    headers, rows = html_table(table)
    methods = [row[0] for row in rows]
    assert len(methods) == len(METHODS) and methods[0].startswith("Dense") and headers[0] == "method"
    assert [g["caption"] for g in gallery] == methods  # each picture named by its method
    assert [d["method"] for d in data] == ["dense", *(m for m in METHODS if m != "dense")]
    # ZipVL sits beside the others; its budget column says what its τ amounted to, never "budget met"
    zipvl = next(r for r in rows if r[0] == "ZipVL")
    budget = headers.index("budget")
    assert zipvl[budget].startswith("no budget: τ = 0.975") and "met" not in zipvl[budget]
    assert "attended" in zipvl[headers.index("equal tokens in / out (computed)")]
    summary = next(d for d in data if d["method"] == "zipvl")["summary"]
    assert summary["attention"]["attended_visual"] < 144 and summary["budget_met"] is None


# --- the data API: /run and /compare ------------------------------------------------------------------------
def run_api(client: Client, image, question="what colour is the circle ?", **kw) -> dict:
    img = handle_file(str(image)) if image is not None else None
    return client.predict(image=img, question=question, api_name="/run", **kw)


DETERMINISTIC = ("method", "config", "model", "question", "prompt", "answer", "image_size", "input_region", "grid",
                 "prefix_tokens", "visual_tokens", "text_tokens", "generated_tokens", "raters", "layers", "cost",
                 "notes")


def test_run_returns_the_cli_trace(client, server, files, tmp_path):
    """/run's trace is the object `python -m sparsevlm run --trace-out` writes, for the same input."""
    out = tmp_path / "cli-trace.json"
    question = "what colour is the circle ?"
    proc = subprocess.run(
        [sys.executable, "-m", "sparsevlm", "run", "--model", str(server.model_dir), "--image", str(files["rgb.png"]),
         "--question", question, "--method", "sparsevlm", "--budget", "64", "--max-new-tokens", "4", "--json",
         "--trace-out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    cli = json.loads(out.read_text())
    record = run_api(client, files["rgb.png"], question, method="sparsevlm", budget=64, max_new_tokens=4)
    assert set(record) == {"answer", "dense_answer", "agrees_with_dense", "trace", "dense_trace", "unknown_words",
                           "ground_truth"}
    assert record["unknown_words"] == [] and record["ground_truth"] is None  # known words, an upload
    api = record["trace"]
    assert set(api) == set(cli)
    for key in DETERMINISTIC:  # timings are measured, so they differ run to run
        assert api[key] == pytest.approx(cli[key]) if key == "cost" else api[key] == cli[key], key
    assert len(api["stages"]) == len(cli["stages"]) > 0
    for a, b in zip(api["stages"], cli["stages"]):
        a.pop("overhead_ms"), b.pop("overhead_ms")
        assert a.pop("scores") == pytest.approx(b.pop("scores"), rel=1e-4, abs=1e-7)
        assert a == b
    assert record["answer"] == cli["answer"] == json.loads(proc.stdout)["answer"]
    assert record["dense_trace"]["method"] == "dense" and record["dense_answer"] == record["dense_trace"]["answer"]


def test_run_defaults_come_from_the_page(client, files):
    record = run_api(client, files["rgb.png"], max_new_tokens=2)
    cfg = record["trace"]["config"]
    from sparsevlm.config import PruneConfig

    d = PruneConfig()
    opts = cfg["options"]
    assert (cfg["method"], opts["count_mode"], opts["lam"], opts["scale"], opts["recycle"]) == (
        d.method, d.count_mode, d.lam, d.scale, d.recycle)
    assert record["trace"]["generated_tokens"] <= 2


def test_compare_returns_data_per_method(client, files):
    data = client.predict(handle_file(str(files["rgb.png"])), "what colour is the circle ?", 64, 2,
                          api_name="/compare")
    assert [d["method"] for d in data] == ["dense", *(m for m in METHODS if m != "dense")]
    for d in data:
        assert d["available"] and d["error"] is None
        assert d["summary"]["method"] == d["method"] and d["answer"] == d["summary"]["answer"]
        assert d["summary"]["timings_ms"]["prefill"] > 0 and "equal_tokens" in d["summary"]
    assert data[0]["agrees_with_dense"] is True
    assert data[1]["summary"]["budget_figure"] == pytest.approx(64, abs=1) and data[1]["summary"]["budget_met"]


def test_old_callers_by_position_still_reach_sparsevlms_options(client, files):
    """/run's parameters before each method declared its options, by position: image, question, method, budget,
    accounting, count_mode, lam, scale, bias, recycle, max_new_tokens; ZipVL's come after, with defaults."""
    params = [p["parameter_name"] for p in client.view_api(return_format="dict", print_info=False)
              ["named_endpoints"]["/run"]["parameters"]]
    assert params == ["image", "question", "method", "budget", "accounting", "count_mode", "lam", "scale", "bias",
                      "recycle", "max_new_tokens", "zipvl_tau", "zipvl_probes", "zipvl_fit"]
    record = client.predict(handle_file(str(files["rgb.png"])), "what colour is the circle ?", "sparsevlm", 64,
                            "paper", "code", 1.0, 2.0, 1.0, False, 1, api_name="/run")
    cfg = record["trace"]["config"]
    assert cfg["options"]["count_mode"] == "code" and cfg["options"]["scale"] == 2.0
    assert cfg["options"]["recycle"] is False and "tau" not in cfg["options"] or cfg["options"]["tau"] == 0.3
    assert record["trace"]["generated_tokens"] <= 1


def test_zipvl_through_the_api_and_its_views(client, files):
    """ZipVL by its page parameters: the trace records each layer's attended set (and, with probes both, the
    agreement with full attention); only ZipVL's options reach the config; /explain draws its count chart beside
    SparseVLM's, FastV's and PyramidDrop's, the mass curve and the probe rows."""
    record = run_api(client, files["rgb.png"], method="zipvl", zipvl_tau=0.9, zipvl_probes="both", lam=0.5,
                     max_new_tokens=2)
    tr = record["trace"]
    assert tr["config"]["options"]["tau"] == 0.9 and tr["config"]["options"]["probes"] == "both"
    assert "lam" not in tr["config"]["options"] and "count_mode" not in tr["config"]["options"]
    assert len(tr["attention"]) == 8 and all("full" in a["extras"] for a in tr["attention"])
    assert "no budget" in tr["cost"]["budget_note"] and not tr["stages"]
    out = explain(client, files["rgb.png"], method="zipvl", zipvl_tau=0.9, max_new_tokens=2)
    assert all(v["visible"] for v in out[11:14])  # shown for ZipVL
    caption, counts_compare, mass_curve, probes = out[6], out[11]["value"], out[12]["value"], out[13]["value"]
    assert "took part in attention" in caption and "come back" in caption
    assert "no budget" in out[0] and "met" not in out[0].split("sv-k")[1].split("</div>")[0]
    plot = counts_compare["plot"]
    for name in ("ZipVL: visual tokens attended (adaptive: τ = 0.9)", "SparseVLM: visual tokens kept (adaptive",
                 "FastV: visual tokens kept (fixed schedule)", "PyramidDrop: visual tokens kept (fixed schedule)"):
        assert name in plot, name
    assert "τ = 0.9" in mass_curve["plot"] and "p = " in mass_curve["plot"]
    assert "Probe rows at layer" in probes and "not recorded for this run" in probes
    assert out[-1]["trace"]["method"] == "zipvl"
    headers, rows = html_table(out[9])
    assert any(r[0].startswith("visual tokens attended per layer") for r in rows)


def test_zipvl_tau_fitted_to_the_budget(client, server, files):
    """The separate, labelled option: τ fitted per input so the mean attended visual tokens meet the budget (paper
    accounting), said so in the budget line; in flops accounting the dense MLP alone exceeds a small budget, and
    the message says ZipVL cannot meet it."""
    out = explain(client, files["rgb.png"], method="zipvl", zipvl_fit="budget", budget=96, max_new_tokens=1)
    cost = out[-1]["trace"]["cost"]
    assert cost["budget"] == 96 and cost["budget_counting"] == "attended" and not cost["budget_note"]
    assert "τ fitted to the budget" in out[0] and "visual tokens attended per layer" in out[0]
    assert out[-1]["trace"]["config"]["options"]["fit"] == "budget"
    with pytest.raises(AppError, match="cannot meet a flops budget") as err:
        run_api(client, files["rgb.png"], method="zipvl", zipvl_fit="budget", accounting="flops", budget=64,
                max_new_tokens=1)
    assert "Traceback" not in str(err.value) and server.alive()


@pytest.mark.parametrize("kw,needle", [
    ({"zipvl_tau": 0}, r"zipvl option tau must lie in \(0, 1\], not 0"),
    ({"zipvl_tau": -0.5}, r"zipvl option tau must lie in \(0, 1\], not -0.5"),
    ({"zipvl_tau": 1.5}, r"zipvl option tau must lie in \(0, 1\], not 1.5"),
    ({"zipvl_probes": "some"}, "zipvl option probes must be one of recent\\+random, all, both, not 'some'"),
    ({"zipvl_fit": "maybe"}, "zipvl option fit must be one of none, budget"),
    ({"lam": -1, "method": "sparsevlm", "count_mode": "paper"}, "sparsevlm option lam must be >= 0, not -1"),
])
@pytest.mark.parametrize("endpoint", ["/run", "/explain"])
def test_bad_method_options_are_clear_messages(client, server, files, kw, needle, endpoint):
    kw = {"method": "zipvl", **kw}
    with pytest.raises(AppError, match=needle) as err:
        client.predict(image=handle_file(str(files["rgb.png"])), question="what colour is the circle ?",
                       max_new_tokens=1, api_name=endpoint, **kw)
    assert "Traceback" not in str(err.value)
    assert server.alive()


# --- the vocabulary hint and the scene studio -------------------------------------------------------------------
def test_unknown_words_are_flagged_and_the_run_still_happens(client, files):
    """`color` is not in the tiny model's word-level vocabulary (`colour` is): /run names it with the suggestion,
    /explain shows the notice above the results, and both still answer."""
    question = "what color is the circle ?"
    record = run_api(client, files["rgb.png"], question, max_new_tokens=1)
    assert record["unknown_words"] == [["color", "colour"]]
    assert record["trace"]["generated_tokens"] >= 1 and record["answer"] == record["trace"]["answer"]
    notice = explain(client, files["rgb.png"], question, max_new_tokens=1)[-2]
    assert "color" in notice and "did you mean <b>colour</b>" in notice and "&lt;unk&gt;" in notice


def new_scene(c: Client, seed: int, family: str, world: str | None = None) -> tuple[str, str, dict, int]:
    kw = {} if world is None else {"world": world}  # `world` is optional: the model's own world by default
    image, question, truth, next_seed, _line = c.predict(seed=seed, family=family, api_name="/new_scene", **kw)
    return image, question, truth, next_seed


def test_new_scene_is_deterministic_per_seed_and_family(server):
    from sparsevlm.scenes.worlds import studio_item

    c = Client(server.url, verbose=False)
    a = new_scene(c, 7, "count")
    b = new_scene(c, 7, "count")
    other = new_scene(c, 8, "count")
    assert a[1] == b[1] and a[2] == b[2] and a[3] == 8
    assert (np.asarray(Image.open(a[0])) == np.asarray(Image.open(b[0]))).all()
    assert not (np.asarray(Image.open(a[0])) == np.asarray(Image.open(other[0]))).all()
    assert a[1].lower().startswith("how many") and a[2]["family"] == "count" and a[2]["seed"] == 7
    assert Image.open(a[0]).size == (336, 336) and a[2]["grid"] == [24, 24]
    for family in ("colour", "read", "exist"):  # the question of the asked family (the tiny model's default: v2)
        _, question, truth, _ = new_scene(c, 3, family)
        assert truth["family"] == family and question == studio_item(3, family, "v2").sample.question
    with pytest.raises(AppError, match="weather is not in the list of choices"):
        new_scene(c, 1, "weather")
    with pytest.raises(AppError, match="less than minimum value 0"):
        new_scene(c, -5, "colour")


def test_new_scene_draws_from_every_world(server):
    """v2 and the independent renderer through /new_scene; without `world`, the model's own (the tiny model records
    none: the embedded model's world, v2, the same scene as asking for v2); an unknown world is refused with the
    list of worlds."""
    from sparsevlm.scenes.worlds import studio_item

    c = Client(server.url, verbose=False)
    default = new_scene(c, 4, "shape")
    v2 = new_scene(c, 4, "shape", "v2")
    assert default[2]["world"] == "v2" and default[1] == v2[1]
    assert (np.asarray(Image.open(default[0])) == np.asarray(Image.open(v2[0]))).all()
    for world in ("v2", "independent"):
        image, question, truth, _ = new_scene(c, 4, "shape", world)
        again = new_scene(c, 4, "shape", world)
        item = studio_item(4, "shape", world)  # the world's own scene for this seed and family
        assert truth["world"] == world and question == item.sample.question == again[1]
        assert truth["answer"] == item.sample.answer and truth["evidence"] == item.sample.evidence
        assert (np.asarray(Image.open(image).convert("RGB")) == np.asarray(item.image.convert("RGB"))).all()
    with pytest.raises(AppError, match="v3 is not in the list of choices"):
        new_scene(c, 1, "colour", "v3")


def test_studio_scene_runs_on_a_model_without_its_words_with_the_word_notice(server):
    """The tiny model knows a few plain words only: a v2 question with `color` still runs, names the unknown word
    with its suggestion, and reports the scene's ground truth and evidence recall."""
    from sparsevlm.scenes.worlds import studio_item

    seed = next(s for s in range(200) if " color " in f" {studio_item(s, 'colour', 'v2').sample.question.lower()} ")
    c = Client(server.url, verbose=False)
    image, question, truth, _ = new_scene(c, seed, "colour", "v2")
    record = run_api(c, image, question, max_new_tokens=1, budget=64)
    assert ["color", "colour"] in record["unknown_words"]
    gt = record["ground_truth"]
    assert gt["world"] == "v2" and gt["answer"] == truth["answer"] and gt["evidence"]
    assert 0.0 <= gt["evidence_recall"]["kept"] <= gt["evidence_recall"]["represented"] <= 1.0


def test_studio_scene_and_model_world_outside_the_server(tmp_path, monkeypatch):
    """The app's own functions: unknown world / family are InputErrors; a model folder whose training_state.json
    says independent puts it first in the picker, marked as the model's world; one that records none is offered
    the embedded model's world first, unmarked."""
    from app.handlers import Handlers, model_world, studio_scene, studio_world, world_choices
    from sparsevlm.errors import InputError
    from sparsevlm.loading import ModelCache, load_model

    with pytest.raises(InputError, match="world must be one of v2, independent, hires, independent-hires, not .mars."):
        studio_scene(1, "colour", "mars")
    with pytest.raises(InputError, match="family must be one of"):
        studio_scene(1, "weather", "v2")
    folder = tmp_path / "m"
    save_tiny(folder, "llama")
    lm = load_model(str(folder))
    assert model_world(lm) is None and studio_world(lm) == "v2"
    choices = world_choices(None)
    assert [v for _, v in choices] == ["v2", "independent"] and not any("this model's world" in c for c, _ in choices)
    assert "the embedded model's world" in choices[0][0]
    (folder / "training_state.json").write_text(json.dumps({"world": "independent"}))
    assert model_world(load_model(str(folder))) == "independent"
    # the studio draws from the session model's own world unless asked for another
    monkeypatch.setenv("SPARSEVLM_MODELS_DIR", str(tmp_path))
    key = str(folder.resolve())
    models = ModelCache()
    models.put(key, load_model(key))
    handlers = Handlers(models, key, [])
    assert handlers.new_scene(3, "colour", None, key)[2]["world"] == "independent"
    assert handlers.new_scene(3, "colour", "v2", key)[2]["world"] == "v2"
    choices = world_choices("independent")
    assert [v for _, v in choices] == ["independent", "v2"] and "this model's world" in choices[0][0]
    assert "pictures no model was trained on" in choices[0][0] and "this model's world" not in choices[1][0]


def _recall_from_trace(trace: dict, evidence: list[int]) -> dict:
    """Evidence recall at the last decoder layer, from the trace's stages (independent of app.render)."""
    n_layers = len(trace["layers"])
    stages = [s for s in trace["stages"] if s["after_layer"] < n_layers - 1]
    ev = set(evidence)
    if not stages:
        return {"kept": 1.0, "represented": 1.0}
    kept = set(stages[-1]["kept"])
    represented = kept | {p for m in stages[-1]["merged"] for p in m["members"]}
    return {"kept": len(ev & kept) / len(ev), "represented": len(ev & represented) / len(ev)}


def test_studio_run_reports_ground_truth_and_evidence_recall(server, files):
    c = Client(server.url, verbose=False)  # its own session: the scene's ground truth lives in it
    image, question, truth, _ = new_scene(c, 5, "colour")
    record = run_api(c, image, question, max_new_tokens=1, budget=64)
    gt = record["ground_truth"]
    assert gt["answer"] == truth["answer"] and gt["family"] == "colour" and gt["seed"] == 5
    # the world marks 14 px patches on its 24x24 grid; the tiny model sees 28 px patches on 12x12
    expected = sorted({(p // 24 // 2) * 12 + (p % 24) // 2 for p in truth["evidence"]})
    assert gt["evidence"] == expected and expected
    want = _recall_from_trace(record["trace"], expected)
    rec = gt["evidence_recall"]
    assert rec["evidence_patches"] == len(expected)
    assert rec["kept"] == pytest.approx(want["kept"]) and rec["represented"] == pytest.approx(want["represented"])
    assert rec["merged_only"] == pytest.approx(want["represented"] - want["kept"])
    steps = gt["evidence_recall_per_stage"]
    assert [s["after_layer"] for s in steps] == [s["after_layer"] for s in record["trace"]["stages"]]
    assert steps[-1]["kept"] == pytest.approx(want["kept"])
    # the answer panel shows the true answer and the same figures
    out = explain(c, image, question, max_new_tokens=1)
    assert f"true answer <b>{truth['answer']}</b>" in out[0] and f"{rec['kept']:.0%} kept" in out[0]
    # the evidence is outlined in white on the overlay (512x512: 42.67 px per model patch); not on another question
    white = (255, 255, 255)
    with_ev = np.asarray(Image.open(out[4]).convert("RGB"))
    other_question = explain(c, image, "what colour is the circle ?", max_new_tokens=1)
    without = np.asarray(Image.open(other_question[4]).convert("RGB"))
    r, col = divmod(expected[0], 12)
    x0, y0 = round(col * 512 / 12), round(r * 512 / 12)
    left_edge = (slice(y0 + 8, y0 + 34), slice(max(0, x0 - 1), x0 + 2))
    assert (with_ev[left_edge] == white).all(axis=-1).any(axis=1).mean() > 0.5
    assert (without[left_edge] == white).all(axis=-1).mean() < 0.1
    # an edited question or another picture is no longer the scene
    assert run_api(c, image, "what colour is the circle ?", max_new_tokens=1)["ground_truth"] is None
    assert run_api(c, files["rgb.png"], question, max_new_tokens=1)["ground_truth"] is None


def test_studio_compare_has_the_evidence_column(server, files):
    c = Client(server.url, verbose=False)
    image, question, truth, _ = new_scene(c, 11, "shape")
    gallery, table, data = c.predict(handle_file(image), question, 64, 1, api_name="/compare_view")
    headers, rows = html_table(table)
    assert headers[-1].startswith("evidence recall") and "evidence recall at the last layer" in table  # legend
    by_method = {d["method"]: d for d in data}
    assert by_method["dense"]["evidence_recall"]["kept"] == 1.0  # dense keeps every patch
    for row, d in zip(rows, data):
        rec = d.get("evidence_recall")
        if not d["available"]:
            assert row[-1] == "" and rec is None
            continue
        assert 0.0 <= rec["kept"] <= rec["represented"] <= 1.0
        assert row[-1].startswith(f"{rec['kept']:.0%} kept / {rec['represented']:.0%} represented")
    # an upload: the column stays empty
    _, table, data = c.predict(handle_file(str(files["rgb.png"])), question, 64, 1, api_name="/compare_view")
    assert all(row[-1] == "" for row in html_table(table)[1]) and all(d.get("evidence_recall") is None for d in data)


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"question": "  "}, "empty"),
        ({"image": "text.png"}, "not an image"),
        ({"budget": 192}, "larger than the image grid"),
        ({"method": "tome"}, "tome"),
        ({"max_new_tokens": 100000}, "greater than maximum value 64"),
    ],
)
def test_run_bad_input_is_a_clear_error(client, server, files, kw, needle):
    image = files[kw.pop("image", "rgb.png")]
    with pytest.raises(AppError, match=needle) as err:
        run_api(client, image, **kw)
    assert "Traceback" not in str(err.value)
    assert server.alive()


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
    assert out[-1]["trace"]["model"]  # a real run happened


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


# --- the model picker -----------------------------------------------------------------------------------------
def test_picker_loads_a_second_model_and_switches_back(server, files):
    c = Client(server.url, verbose=False)
    other = Client(server.url, verbose=False)  # a second user who never switches
    second = str(server.second_model_dir)
    line, budget = c.predict(second, api_name="/load_model")
    assert "tiny-qwen" in line and "llava-qwen2" in line and "no [CLS]" in line
    assert "loaded in" in line and "unloaded tiny-llava" in line  # only one of the two fits the memory budget
    assert budget in (192, 128, 96, 64) or budget.get("value") in (192, 128, 96, 64)
    record = run_api(c, files["rgb.png"], max_new_tokens=2)
    assert record["trace"]["model"]["name"] == "tiny-qwen" and record["trace"]["model"]["architecture"] == "llava-qwen2"
    line, _ = c.predict(second, api_name="/load_model")
    assert "already in memory" in line  # loaded once
    # the other session still runs the default model (it is loaded again, and says nothing to this one)
    assert run_api(other, files["rgb.png"], max_new_tokens=1)["trace"]["model"]["name"] == "tiny-llava"
    line, _ = c.predict(str(server.model_dir), api_name="/load_model")
    assert "tiny-llava" in line and "llava-llama" in line
    assert run_api(c, files["rgb.png"], max_new_tokens=1)["trace"]["model"]["name"] == "tiny-llava"
    assert server.alive()


@pytest.mark.parametrize("name,needle", [("nobody/no-such-llava", "offline"),
                                         ("/no/such/folder", "is not a model this server offers"), ("", "no model")])
def test_picker_unknown_or_offline_model_names_the_local_ones(client, server, name, needle):
    with pytest.raises(AppError, match=needle) as err:
        client.predict(name, api_name="/load_model")
    msg = str(err.value)
    assert "available locally" in msg and str(server.second_model_dir) in msg and "Traceback" not in msg
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
        record = results[key][-1]
        assert record["trace"]["method"] == m and record["trace"]["question"] == " ".join(q.split())
        downloads, _, _ = exports[key]
        trace = PruneTrace.from_json(Path(next(p for p in downloads if f"trace-{m}" in p)).read_text())
        assert trace.question == " ".join(q.split()) and trace.method == m


# --- start-up ------------------------------------------------------------------------------------------------
def test_missing_model_folder_fails_clearly(tmp_path):
    env = {**os.environ, "SPARSEVLM_MODEL": str(tmp_path / "no-such-model")}
    proc = subprocess.run([sys.executable, "-m", "app", "--port", str(free_port())], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr

"""End-to-end speed of the app: a request -> every view returned, through the public API.

    python -m app.speed --url http://127.0.0.1:7860 --n 20         # /explain on a running app
    python -m app.speed --high-res --n 5                            # a high-resolution example, served here
    python -m app.speed --compare --n 10                            # "Compare all methods", clicked on this app
    python -m app.speed --compare --url URL_A --url URL_B --n 10    # the same click on running apps, in turn
    python -m app.speed --compare --serve ../other-checkout --serve . --n 10   # two checkouts' apps, in turn
    python -m app.speed --compare --engine --n 5                    # the model work alone: each method vs shared

Drives /explain with gradio_client exactly as a user of the API would (upload, SparseVLM at budget 64, the dense
run for comparison, all renderers) and prints p50/p95 of the wall-clock time per request, then the same as JSON.
Time is measured here, on the client; the first request (warm-up) is reported separately and left out.

--high-res times the first high-resolution example (assets/examples-next: a 672x672 picture, 2,928 visual
tokens) on the embedded high-resolution model scenes-llava-next at budget 320, served in this process as
`python -m app` serves it: the first answer after the model loaded, then the next ones.

--compare clicks "Compare all methods" (/compare_view) the way the page does and times what a user waits for:
the request until the gallery, table and record arrive, plus fetching the gallery's pictures (in parallel, as a
browser does). Without --url it serves this checkout's app in this process on a free port (default: the embedded
model), its model work on this process's main thread as `python -m app` runs it, and also splits each click
into its parts, timed inside the server: the model work, each renderer, the
encoding of every output, and the rest (queue, events, transfer), with the payload's bytes. With one or more
--url or --serve it clicks several apps in turn (A B A B ...), so machine load hits each alike, and reports each
one's figures and the ratio to the first, pair by pair; an app --serve started (a checkout folder's `python -m
app` in a subprocess) also reports its CPU time per click, which load from other programs inflates far less
than the wall-clock time.

--compare --engine times the model work of "Compare all methods" in this process, two ways side by side,
interleaved: every method run alone (`pipeline.run` once per method: the image processed and encoded once per
method) and one request (`pipeline.run_shared`: processor, vision tower + projector and shared raters once). Both
add the page's compare renderers; the decisions of both are checked to be identical.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .mainthread import MAIN

ROOT = Path(__file__).resolve().parent.parent


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


NEXT_MODEL = "scenes-llava-next"


def default_example(high_res: bool = False) -> tuple[str, str]:
    index = ROOT / "assets" / ("examples-next" if high_res else "examples") / "examples.json"
    if index.is_file():
        items = json.loads(index.read_text())
        if items:
            img = Path(items[0]["image"])
            img = img if img.is_absolute() else index.parent / img
            return str(img), items[0]["question"]
    raise SystemExit(f"no --image given and {index.relative_to(ROOT)} is missing")


def engine_bench(model: str | None, image_path: str, question: str, budget: int, n: int,
                 max_new_tokens: int) -> dict:
    """Wall-clock ms of "Compare all methods" done method by method and as one shared request (--compare
    --engine)."""
    import torch
    from PIL import Image

    from sparsevlm.config import PruneConfig
    from sparsevlm.errors import ConfigError
    from sparsevlm.loading import DEFAULT_MODEL, load_model
    from sparsevlm.methods import METHODS
    from sparsevlm.pipeline import Decoding, RunResult, run, run_shared

    from . import render

    lm = load_model(model or DEFAULT_MODEL)
    image = Image.open(image_path).convert("RGB")
    configs = [PruneConfig(method=m, budget=budget) for m in ("dense", *(m for m in METHODS if m != "dense"))]

    def alone() -> list:
        out = []
        for cfg in configs:
            try:
                out.append(run(lm, image, question, cfg, max_new_tokens=max_new_tokens))
            except ConfigError as exc:
                out.append(exc)
        return out

    def shared() -> list:
        return run_shared(lm, image, question, configs, Decoding(max_new_tokens))

    def views(results: list) -> None:  # what the page draws from the traces after the model work
        rows = [(c.method, r.trace, "") if isinstance(r, RunResult) else (c.method, None, str(r))
                for c, r in zip(configs, results)]
        render.compare_pictures(image, rows)
        for _, tr, _ in rows:
            if tr is not None:
                tr.summary()
        render.compare_table_html(render.compare_rows(rows))

    def decisions(results: list) -> list:
        return [[(s.kept, [(m.center, m.members) for m in s.merged]) for s in r.trace.stages] + [r.answer]
                if isinstance(r, RunResult) else str(r) for r in results]

    ways = {"each method alone": alone, "one shared request": shared}
    samples: dict[str, dict[str, list[float]]] = {w: {"model": [], "views": [], "cpu": []} for w in ways}
    with torch.inference_mode():
        first = {w: f() for w, f in ways.items()}  # warm-up, and the decisions to compare
        for _ in range(n):
            for w, f in ways.items():
                c0, t0 = time.process_time(), time.perf_counter()
                results = f()
                t1 = time.perf_counter()
                views(results)
                t2, c2 = time.perf_counter(), time.process_time()
                samples[w]["model"].append((t1 - t0) * 1e3)
                samples[w]["views"].append((t2 - t1) * 1e3)
                samples[w]["cpu"].append((c2 - c0) * 1e3)
    rows = {}
    for w, s in samples.items():
        request = [a + b for a, b in zip(s["model"], s["views"])]
        rows[w] = {"model_ms_p50": round(percentile(s["model"], 0.5), 1),
                   "views_ms_p50": round(percentile(s["views"], 0.5), 1),
                   "request_ms_p50": round(percentile(request, 0.5), 1),
                   "request_ms_min": round(min(request), 1) if request else None,
                   # CPU time of this process over the request: other programs' load does not inflate it (with
                   # several threads it may exceed the wall-clock time)
                   "request_cpu_ms_p50": round(percentile(s["cpu"], 0.5), 1)}
    before, after = rows["each method alone"], rows["one shared request"]
    return {
        "model": lm.name, "device": str(lm.device), "threads": torch.get_num_threads(), "image": image_path,
        "question": question, "budget": budget, "max_new_tokens": max_new_tokens, "n": n,
        "methods": [c.method for c in configs], "ways": rows,
        "speedup_p50": round(before["request_ms_p50"] / after["request_ms_p50"], 2),
        "cpu_speedup_p50": round(before["request_cpu_ms_p50"] / after["request_cpu_ms_p50"], 2),
        "decisions_identical": decisions(first["each method alone"]) == decisions(first["one shared request"]),
        "includes": "model work (processor, vision tower + projector, every method's generate) + the page's compare "
                    "renderers; in-process wall-clock, no network or Gradio queue",
    }


def print_engine(result: dict) -> None:
    print(f"Compare all methods ({len(result['methods'])} runs) on {result['model']}, {result['device']}, "
          f"{result['threads']} threads, n={result['n']}, measured wall-clock ms")
    print(f"{'way':<22}{'model p50':>11}{'views p50':>11}{'request p50':>13}{'request min':>13}{'CPU ms p50':>12}")
    for way, r in result["ways"].items():
        print(f"{way:<22}{r['model_ms_p50']:>11.1f}{r['views_ms_p50']:>11.1f}{r['request_ms_p50']:>13.1f}"
              f"{r['request_ms_min']:>13.1f}{r['request_cpu_ms_p50']:>12.1f}")
    print(f"speed-up (p50): {result['speedup_p50']}x wall-clock, {result['cpu_speedup_p50']}x CPU time; "
          f"decisions identical: {result['decisions_identical']}")
    print(json.dumps(result))


# --- "Compare all methods", clicked ---------------------------------------------------------------------------
# Parts of one click timed inside the server (when this process serves the app): (owner, attribute, part). The
# owner is "handlers", "render" or a Gradio component class; a part missing from the code is left out.
CLICK_PARTS: tuple[tuple[str, str, str], ...] = (
    ("handlers", "compare_model_runs", "engine: model work (processor, vision tower + projector, raters, generate)"),
    ("render", "compare_pictures", "render: last-layer picture per method"),
    ("render", "compare_rows", "render: table rows"),
    ("render", "compare_table_html", "render: table HTML"),
    ("handlers", "compare_record", "render: /compare record (per-method summaries)"),
    ("Gallery", "postprocess", "serialize: pictures encoded + cached"),
    ("HTML", "postprocess", "serialize: table"),
    ("JSON", "postprocess", "serialize: record"),
)
HANDLER = "handler total"


class PartTimer:
    """Wraps functions and methods in place to add up their wall-clock ms per part until `restore`; one click at a
    time (the benchmark's clicks are sequential), so the sums belong to the click in flight."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self._lock = threading.Lock()
        self._undo: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, attr: str, part: str) -> None:
        original = getattr(owner, attr, None)
        if original is None:
            return

        def timed(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                with self._lock:
                    self.ms[part] = self.ms.get(part, 0.0) + (time.perf_counter() - t0) * 1e3

        self._undo.append((owner, attr, original))
        setattr(owner, attr, timed)

    def take(self) -> dict[str, float]:
        with self._lock:
            out, self.ms = self.ms, {}
        return out

    def restore(self) -> None:
        for owner, attr, original in reversed(self._undo):
            setattr(owner, attr, original)
        self._undo.clear()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_here(model: str | None, time_parts: bool = True) -> tuple[str, Any, PartTimer]:
    """This checkout's app on a free port in this process, its compare parts timed (time_parts); returns (url,
    demo, timer)."""
    import gradio as gr

    from sparsevlm.loading import DEFAULT_MODEL, ModelAccess, ModelCache, resolve

    from . import handlers, layout, render

    timer = PartTimer()
    owners = {"handlers": handlers, "render": render, "Gallery": gr.Gallery, "HTML": gr.HTML, "JSON": gr.JSON}
    if time_parts:
        for owner, attr, part in CLICK_PARTS:
            timer.wrap(owners[owner], attr, part)
        timer.wrap(handlers.Handlers, "compare_view", HANDLER)  # before the page binds it
    name = model or DEFAULT_MODEL
    access = ModelAccess.for_server(name)
    models = ModelCache(None, access=access)
    key = ModelCache.key(resolve(name, access))
    models.get(key)
    demo = layout.build_app(models, key, examples=handlers.load_examples())
    demo.queue(default_concurrency_limit=1)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False,
                **layout.launch_kwargs())
    return f"http://127.0.0.1:{port}/", demo, timer


def serve_checkout(folder: str, model: str | None, threads: int | None, log: Path) -> tuple[str, subprocess.Popen]:
    """`python -m app` of the checkout in `folder` on a free port, in a subprocess whose CPU time can be read."""
    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "app", "--port", str(port), *(["--model", model] if model else [])]
    proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 900  # a busy machine can take minutes to import torch and gradio
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the app in {folder} exited early; its log: {log}")
        try:
            urllib.request.urlopen(url, timeout=5)
            return url, proc
        except OSError:
            time.sleep(1)
    proc.terminate()
    raise SystemExit(f"the app in {folder} did not start in time; its log: {log}")


def cpu_ms(pid: int) -> float | None:
    """CPU time (user + system) a process has used so far, from /proc (None where there is none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) * 1e3 / os.sysconf("SC_CLK_TCK")


def click_compare(client: Any, image: str, question: str, budget: int, max_new_tokens: int,
                  fetch: ThreadPoolExecutor) -> dict:
    """One "Compare all methods" click: the request, then the gallery's pictures fetched in parallel."""
    from gradio_client import handle_file

    t0 = time.perf_counter()
    gallery, table, record = client.predict(handle_file(image), question, budget, max_new_tokens,
                                            api_name="/compare_view")
    t1 = time.perf_counter()
    urls = [g["image"]["url"] for g in gallery]

    def get(url: str) -> int:
        with urllib.request.urlopen(url, timeout=120) as r:
            return len(r.read())

    sizes = list(fetch.map(get, urls))
    t2 = time.perf_counter()
    return {"click_ms": (t2 - t0) * 1e3, "request_ms": (t1 - t0) * 1e3, "pictures_ms": (t2 - t1) * 1e3,
            "message_bytes": len(json.dumps([gallery, table, record]).encode()), "picture_bytes": sum(sizes),
            "pictures": len(sizes), "methods": [r["method"] for r in record]}


def _stats(values: list[float]) -> dict:
    return {"p50": round(percentile(values, 0.5), 1), "p90": round(percentile(values, 0.9), 1),
            "min": round(min(values), 1) if values else None}


def click_bench(urls: list[str] | None, model: str | None, image: str, question: str, budget: int, n: int,
                max_new_tokens: int, serve: list[str] | None = None, threads: int | None = None) -> dict:
    """--compare: N clicks (after one warm-up each) on this app served here, or in turn on the apps of the
    checkouts in `serve` (started here in subprocesses: their CPU time per click is read too) and running `urls`."""
    import tempfile

    import torch
    from gradio_client import Client

    demo, timer = None, None
    procs: list[subprocess.Popen] = []
    names: list[str] = []
    try:
        if not urls and not serve:
            url, demo, timer = serve_here(model)
            targets, pids, names = [url], [None], ["this checkout, served here"]
        else:
            logs = Path(tempfile.mkdtemp(prefix="sparsevlm-speed-"))
            targets, pids = [], []
            for k, folder in enumerate(serve or []):
                url, proc = serve_checkout(folder, model, threads, logs / f"app-{k}.log")
                procs.append(proc)
                targets.append(url)
                pids.append(proc.pid)
                names.append(str(Path(folder).resolve()))
            targets += urls or []
            pids += [None] * len(urls or [])
            names += list(urls or [])
        clients = [Client(u, verbose=False, download_files=False) for u in targets]

        def click(i: int, fetch: ThreadPoolExecutor) -> dict:
            c0 = cpu_ms(pids[i]) if pids[i] else None
            out = click_compare(clients[i], image, question, budget, max_new_tokens, fetch)
            c1 = cpu_ms(pids[i]) if pids[i] else None
            if c0 is not None and c1 is not None:
                out["server_cpu_ms"] = c1 - c0
            return out

        clicks: list[list[dict]] = [[] for _ in targets]

        def clicking() -> None:
            with ThreadPoolExecutor(6) as fetch:  # a browser fetches about six files at once from one host
                for i in range(len(clients)):  # warm-up
                    click(i, fetch)
                if timer:
                    timer.take()
                for _ in range(n):
                    for i in range(len(clients)):
                        clicks[i].append(click(i, fetch))
                        if timer:
                            clicks[i][-1]["parts_ms"] = timer.take()

        if demo is None:
            clicking()
        else:  # served here as `python -m app` serves: the model work on this (the main) thread, the clicks beside
            failed: list[BaseException] = []

            def clicks_beside() -> None:
                try:
                    clicking()
                except BaseException as exc:  # noqa: BLE001 - raised again below, on the main thread
                    failed.append(exc)

            clicker = threading.Thread(target=clicks_beside, daemon=True)
            clicker.start()
            MAIN.serve(until=lambda: not clicker.is_alive())
            clicker.join()
            if failed:
                raise failed[0]
    finally:
        if timer:
            timer.restore()
        if demo is not None:
            demo.close()
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    runs = []
    for u, name, cs in zip(targets, names, clicks, strict=True):
        row: dict[str, Any] = {
            "app": name, "url": u, "click_ms": _stats([c["click_ms"] for c in cs]),
            "request_ms": _stats([c["request_ms"] for c in cs]), "pictures_ms": _stats([c["pictures_ms"] for c in cs]),
            "message_bytes": cs[-1]["message_bytes"] if cs else None,
            "picture_bytes": cs[-1]["picture_bytes"] if cs else None, "pictures": cs[-1]["pictures"] if cs else None,
        }
        if cs and "server_cpu_ms" in cs[0]:
            row["server_cpu_ms"] = _stats([c["server_cpu_ms"] for c in cs])
        if cs and "parts_ms" in cs[0]:
            parts = {part for c in cs for part in c["parts_ms"]}
            per = {p: [c["parts_ms"].get(p, 0.0) for c in cs] for p in parts}
            inner = [sum(v for p, v in c["parts_ms"].items() if p != HANDLER and not p.startswith("serialize"))
                     for c in cs]
            serialize = [sum(v for p, v in c["parts_ms"].items() if p.startswith("serialize")) for c in cs]
            per["handler: other (inputs, traces as data, progress)"] = [
                c["parts_ms"].get(HANDLER, 0.0) - x for c, x in zip(cs, inner, strict=True)]
            per["transfer: queue, events, upload, picture fetches"] = [
                c["click_ms"] - c["parts_ms"].get(HANDLER, 0.0) - s for c, s in zip(cs, serialize, strict=True)]
            order = [part for _, _, part in CLICK_PARTS] + ["handler: other (inputs, traces as data, progress)",
                                                             "transfer: queue, events, upload, picture fetches"]
            row["parts_ms_p50"] = {p: round(percentile(per[p], 0.5), 1) for p in order if p in per}
            row["handler_ms_p50"] = round(percentile(per.get(HANDLER, []), 0.5), 1)
        runs.append(row)
    first = clicks[0]
    for row, cs in zip(runs[1:], clicks[1:], strict=True):
        # pair by pair: click k of this app against click k of the first, taken one after the other
        row["ratio_to_first_p50"] = round(percentile([b["click_ms"] / a["click_ms"]
                                                      for a, b in zip(first, cs, strict=True)], 0.5), 3)
        if "server_cpu_ms" in row and "server_cpu_ms" in runs[0]:
            row["server_cpu_ratio_to_first_p50"] = round(percentile(
                [b["server_cpu_ms"] / a["server_cpu_ms"] for a, b in zip(first, cs, strict=True)
                 if a["server_cpu_ms"] > 0], 0.5), 3)
    return {"what": "Compare all methods (/compare_view) clicked through gradio_client, pictures fetched in "
                    "parallel: client-side wall-clock ms, measured",
            "served_here": demo is not None, "server_threads": threads,
            "model": model or "embedded (assets/models/scenes-llava)",
            "threads": torch.get_num_threads(), "image": image, "question": question, "budget": budget,
            "max_new_tokens": max_new_tokens, "n": n, "methods": clicks[0][-1]["methods"] if clicks[0] else [],
            "runs": runs}


def print_clicks(result: dict) -> None:
    print(f"{result['what']}; {len(result['methods'])} methods, n={result['n']} after one warm-up, "
          f"{result['threads']} torch threads{' (server in this process)' if result['served_here'] else ''}")
    print(f"{'app':<32}{'click p50':>11}{'p90':>9}{'min':>9}{'request p50':>13}{'pictures p50':>14}"
          f"{'message KiB':>13}{'pictures KiB':>14}{'ratio':>8}{'server CPU p50':>16}{'CPU ratio':>11}")
    for r in result["runs"]:
        ratio = f"{r['ratio_to_first_p50']:.3f}" if "ratio_to_first_p50" in r else "1"
        cpu = f"{r['server_cpu_ms']['p50']:.0f}" if "server_cpu_ms" in r else "-"
        cpu_ratio = f"{r['server_cpu_ratio_to_first_p50']:.3f}" if "server_cpu_ratio_to_first_p50" in r else "-"
        print(f"{r['app'][-32:]:<32}{r['click_ms']['p50']:>11.1f}{r['click_ms']['p90']:>9.1f}"
              f"{r['click_ms']['min']:>9.1f}{r['request_ms']['p50']:>13.1f}{r['pictures_ms']['p50']:>14.1f}"
              f"{r['message_bytes'] / 1024:>13.1f}{r['picture_bytes'] / 1024:>14.1f}{ratio:>8}{cpu:>16}{cpu_ratio:>11}")
        if "parts_ms_p50" in r:
            total = r["click_ms"]["p50"] or 1.0
            print(f"  {'part of a click (p50 over clicks, measured)':<78}{'ms':>9}{'share':>8}")
            for part, ms in r["parts_ms_p50"].items():
                print(f"  {part:<78}{ms:>9.1f}{ms / total:>8.0%}")
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m app.speed", description=__doc__.split("\n")[0])
    p.add_argument("--url", action="append", default=None,
                   help="a running app (default http://127.0.0.1:7860); with --compare, repeat it to click several "
                        "apps in turn, or leave it out to serve this checkout's app here")
    p.add_argument("--n", type=int, default=20, help="timed requests (after one warm-up)")
    p.add_argument("--image", help="image file (default: the first bundled example)")
    p.add_argument("--question", help="question (default: the example's)")
    p.add_argument("--method", default="sparsevlm")
    p.add_argument("--budget", type=int, default=None, help="default: 64, or 320 with --high-res")
    p.add_argument("--high-res", action="store_true",
                   help="the first high-resolution example (assets/examples-next) on scenes-llava-next (or --model), "
                        "served here unless --url: how long its answer takes, the first request and the next ones")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 8 (API), 16 with --compare (the page's)")
    p.add_argument("--json", dest="json_out", help="also write the result JSON here")
    p.add_argument("--compare", action="store_true", help="time a click on Compare all methods (see above)")
    p.add_argument("--serve", action="append", default=None, metavar="CHECKOUT",
                   help="with --compare: start the app of this checkout folder in a subprocess and click it (repeat "
                        "to compare checkouts in turn; their CPU time per click is read too)")
    p.add_argument("--engine", action="store_true",
                   help="with --compare: the model work alone in this process, method by method and shared")
    p.add_argument("--model", default=None, help="with --compare and no --url: the model to load (default: embedded)")
    p.add_argument("--threads", type=int, default=None,
                   help="with --compare: torch threads here and in the apps --serve starts (default: torch's)")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be at least 1")

    image, question = (args.image, args.question) if args.image else default_example(args.high_res)
    question = args.question or question
    budget = args.budget if args.budget is not None else (320 if args.high_res else 64)
    if args.compare:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        max_new = 16 if args.max_new_tokens is None else args.max_new_tokens
        show: Callable[[dict], None]
        if args.engine:
            result = engine_bench(args.model, image, question, budget, args.n, max_new)
            show, ok = print_engine, result["decisions_identical"]
        else:
            result = click_bench(args.url, args.model, image, question, budget, args.n, max_new, args.serve,
                                 args.threads)
            show, ok = print_clicks, True
        show(result)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(result, indent=1))
        return 0 if ok else 1

    max_new = 8 if args.max_new_tokens is None else args.max_new_tokens
    if args.high_res and not args.url:  # served here as `python -m app` serves, the requests from a thread beside
        url, demo, _ = serve_here(args.model or NEXT_MODEL, time_parts=False)
        out: list[dict] = []
        failed: list[BaseException] = []

        def beside() -> None:
            try:
                out.append(explain_bench(url, image, question, args.method, budget, args.n, max_new))
            except BaseException as exc:  # noqa: BLE001 - raised again below, on the main thread
                failed.append(exc)

        worker = threading.Thread(target=beside, daemon=True)
        worker.start()
        try:
            MAIN.serve(until=lambda: not worker.is_alive())
            worker.join()
        finally:
            demo.close()
        if failed:
            raise failed[0]
        result = {**out[0], "served": "this checkout, served here (model work on the main thread, as python -m app)",
                  "example": str(Path(image).name)}
    else:
        result = explain_bench((args.url or ["http://127.0.0.1:7860"])[0], image, question, args.method, budget,
                               args.n, max_new)
    print(f"{'model':<28}{'method':<11}{'budget':>7}{'n':>5}{'first ms':>10}{'p50 ms':>10}{'p95 ms':>10}")
    print(f"{result['model']!s:<28}{args.method:<11}{budget:>7}{args.n:>5}{result['warmup_ms']:>10.1f}"
          f"{result['p50_ms']:>10.1f}{result['p95_ms']:>10.1f}")
    print(json.dumps(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))
    return 0


def explain_bench(url: str, image: str, question: str, method: str, budget: int, n: int, max_new: int) -> dict:
    """/explain as the page's Run (and an example click) calls it: one first request, then `n` timed ones."""
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)

    def once() -> tuple[float, dict]:
        t0 = time.perf_counter()
        out = client.predict(image=handle_file(image), question=question, method=method, budget=budget,
                             max_new_tokens=max_new, api_name="/explain")
        return (time.perf_counter() - t0) * 1e3, out[-1]  # the /run record: both traces

    warm_ms, summary = once()
    times, prefill_pruned, prefill_dense = [], [], []
    for _ in range(n):
        ms, summary = once()
        times.append(ms)
        prefill_pruned.append(summary["trace"]["timings_ms"]["prefill"])
        if summary.get("dense_trace"):
            prefill_dense.append(summary["dense_trace"]["timings_ms"]["prefill"])
    return {
        "url": url,
        "model": summary["trace"]["model"].get("name"),
        "device": summary["trace"]["model"].get("device"),
        "visual_tokens": summary["trace"].get("visual_tokens"),
        "answer": summary["trace"].get("answer"),
        "method": method,
        "budget": budget,
        "max_new_tokens": max_new,
        "n": n,
        "warmup_ms": round(warm_ms, 1),
        "p50_ms": round(percentile(times, 0.5), 1),
        "p95_ms": round(percentile(times, 0.95), 1),
        "mean_ms": round(statistics.fmean(times), 1),
        "server_prefill_ms_p50": {"pruned": round(percentile(prefill_pruned, 0.5), 1),
                                  "dense": round(percentile(prefill_dense, 0.5), 1) if prefill_dense else None},
        "includes": "upload + pruned run + dense run + all renderers + transfer (client wall-clock); warmup_ms is "
                    "the first request after the model loaded",
    }


if __name__ == "__main__":
    sys.exit(main())

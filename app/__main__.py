"""`python -m app`: load the model once, then serve the SparseVLM Explorer.

    python -m app                          # embedded model, http://127.0.0.1:7860
    python -m app --model llava-hf/llava-1.5-7b-hf --host 0.0.0.0 --port 8080   # a preset, hub id or folder
    SPARSEVLM_MODEL=/path/to/folder PORT=7861 python -m app
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "assets" / "models" / "scenes-llava"
DEFAULT_EXAMPLES = ROOT / "assets" / "examples" / "examples.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m app", description="SparseVLM Explorer (Gradio app)")
    p.add_argument("--model", default=os.environ.get("SPARSEVLM_MODEL", str(DEFAULT_MODEL)),
                   help="Hugging Face hub id or local model folder (env SPARSEVLM_MODEL; default: the embedded "
                        "assets/models/scenes-llava)")
    p.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"), help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", "7860")),
                   help="port (env PORT; default 7860)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when present)")
    p.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default: the loader's choice)")
    p.add_argument("--examples", default=os.environ.get("SPARSEVLM_EXAMPLES", str(DEFAULT_EXAMPLES)),
                   help="examples.json to offer as one-click examples (env SPARSEVLM_EXAMPLES)")
    p.add_argument("--queue-size", type=int, default=32, help="requests allowed to wait in the queue")
    mem = os.environ.get("SPARSEVLM_MODEL_MEMORY_GIB")
    p.add_argument("--model-memory-gib", type=float, default=float(mem) if mem else None,
                   help="weights the model picker may keep loaded at once, in GiB; the least recently used model is "
                        "unloaded beyond it (env SPARSEVLM_MODEL_MEMORY_GIB; default: 90%% of the GPU's memory, or "
                        "half the machine's available RAM)")
    p.add_argument("--public", action="store_true", default=None,
                   help="a public server: the model picker offers the presets and local models only and downloads no "
                        "other hub model (env SPARSEVLM_PUBLIC=1)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from sparsevlm.errors import ModelLoadError
    from sparsevlm.loading import ModelAccess, ModelCache, resolve

    model_arg = args.model
    if model_arg == str(DEFAULT_MODEL) and not DEFAULT_MODEL.is_dir():
        print(f"error: the embedded model folder {DEFAULT_MODEL} is missing. Train or copy it there, or pass "
              "--model <hub id or folder> (or set SPARSEVLM_MODEL).", file=sys.stderr)
        return 2
    try:
        limit = None if args.model_memory_gib is None else int(args.model_memory_gib * 2**30)
        # Local folders load from the model roots and the folder named here only, whatever visitors type.
        access = ModelAccess.for_server(model_arg, public=args.public)
        models = ModelCache(limit, device=args.device, dtype=args.dtype, access=access)
        default = ModelCache.key(resolve(model_arg, access))
        lm, _ = models.get(default)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.getLogger("sparsevlm.app").info("loaded %s on %s (%s)", lm.name, lm.device, lm.dtype)

    from .handlers import load_examples
    from .layout import build_app, launch_kwargs

    demo = build_app(models, default, examples=load_examples(Path(args.examples)))
    demo.queue(default_concurrency_limit=1, max_size=args.queue_size)
    from .mainthread import MAIN

    demo.launch(server_name=args.host, server_port=args.port, show_error=True, footer_links=["api"],
                ssr_mode=False, prevent_thread_lock=True, **launch_kwargs())
    # The handlers' model work runs here, on the main thread (app/mainthread.py says why), until interrupted.
    try:
        MAIN.serve()
    except KeyboardInterrupt:
        print("Keyboard interruption in main thread... closing server.")
    finally:
        demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

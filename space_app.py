"""Entry point of a Gradio-SDK Space (the only SDK ZeroGPU runs): `app_file: space_app.py` in the front matter.

It starts the same app as the Docker image's `python -m app`; GPU work inside the app is wrapped with
sparsevlm.gpu.gpu, which is `spaces.GPU` on ZeroGPU and a no-op elsewhere.
"""

import os
import sys

from app.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["--host", os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"),
                   "--port", os.environ.get("GRADIO_SERVER_PORT", os.environ.get("PORT", "7860"))]))

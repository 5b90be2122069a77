# SparseVLM Explorer as a Hugging Face Docker Space (or any container host).
#   CPU image (default):  docker build -t sparsevlm-explorer . && docker run -p 7860:7860 sparsevlm-explorer
#   CUDA image:           docker build --build-arg DEVICE=cuda -t sparsevlm-explorer:cuda . \
#                         && docker run --gpus all -p 7860:7860 sparsevlm-explorer:cuda
# The CUDA image differs only in the torch wheel (its CUDA runtime is inside the wheel; the host needs the NVIDIA
# driver, which GPU Spaces and `docker run --gpus` provide). The app picks CUDA when it sees it (bf16, else fp16).
# NOT VERIFIED: the machines this project is built on cannot run docker (no daemon) or reach PyPI / the hub, so
# neither image has been built; scripts/check-space.sh checks what can be checked without docker.
FROM python:3.11-slim

# cpu or cuda. TORCH_CUDA names the PyTorch wheel index for the CUDA build (override if 2.13.0 moves on).
ARG DEVICE=cpu
ARG TORCH_CUDA=cu128

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends fonts-dejavu-core \
 && rm -rf /var/lib/apt/lists/*

# Spaces run the container as uid 1000.
RUN useradd -m -u 1000 user
# The hub is reachable on Spaces (the model picker downloads checkpoints into the user's cache); timeouts keep
# a hub that does not answer from hanging a request. Set HF_HUB_OFFLINE=1 (a Space variable) to serve only
# local models: unknown ids then fail at once with the list of local ones.
# SPARSEVLM_PUBLIC=1: the picker loads the presets and local models only, never another hub id a visitor types
# (set it to 0 in a private Space to allow any hub id). Local folders load only from assets/models,
# $SPARSEVLM_MODELS_DIR and the --model folder, whatever the setting.
ENV HOME=/home/user \
    PATH=/home/user/.local/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/home/user/.cache/huggingface \
    GRADIO_TEMP_DIR=/home/user/.cache/gradio \
    HF_HUB_ETAG_TIMEOUT=10 \
    HF_HUB_DOWNLOAD_TIMEOUT=60 \
    GRADIO_ANALYTICS_ENABLED=False \
    SPARSEVLM_PUBLIC=1 \
    PORT=7860
WORKDIR /home/user/app

# torch first, from the PyTorch wheel index: the PyPI torch==2.13.0 wheel is the CUDA build and drags in
# gigabytes of CUDA libraries, which only the CUDA image wants.
COPY --chown=user requirements.txt .
RUN if [ "$DEVICE" = "cuda" ]; then index="https://download.pytorch.org/whl/${TORCH_CUDA}"; \
    elif [ "$DEVICE" = "cpu" ]; then index="https://download.pytorch.org/whl/cpu"; \
    else echo "DEVICE must be cpu or cuda, not $DEVICE" >&2; exit 2; fi \
 && pip install --no-cache-dir torch==2.13.0 --index-url "$index" \
 && pip install --no-cache-dir -r requirements.txt

COPY --chown=user . .
USER user

EXPOSE 7860
# scripts/check-space.sh starts the app with exactly this command (it reads it from here).
CMD ["python", "-m", "app", "--host", "0.0.0.0", "--port", "7860"]

# SparseVLM Explorer as a Hugging Face Docker Space (or any container host).
#   docker build -t sparsevlm-explorer . && docker run -p 7860:7860 sparsevlm-explorer
# Serves the embedded model (assets/models/scenes-llava) on CPU with no network access at run time.
FROM python:3.11-slim

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends fonts-dejavu-core \
 && rm -rf /var/lib/apt/lists/*

# Spaces run the container as uid 1000.
RUN useradd -m -u 1000 user
ENV HOME=/home/user \
    PATH=/home/user/.local/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    PORT=7860
WORKDIR /home/user/app

# torch first, from the CPU wheel index: the PyPI torch==2.13.0 wheel drags in gigabytes of CUDA libraries.
COPY --chown=user requirements.txt .
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir -r requirements.txt

COPY --chown=user . .
USER user

EXPOSE 7860
CMD ["python", "-m", "app", "--host", "0.0.0.0", "--port", "7860"]

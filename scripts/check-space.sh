#!/usr/bin/env bash
# What can be checked of the Docker Space without docker: the Dockerfile's requirements installed into a fresh
# virtual environment, the app started the way the image's CMD starts it, as a non-root user (uid 1000, like
# Spaces), with the Hugging Face hub offline; then the page and the API must answer on the port; then it stops.
#
# DOCKER ITSELF IS NOT RUN: the machines this project is built on have the docker client but no daemon, and no
# network. So the image build (apt, pip from PyPI and the PyTorch index) is NOT checked here.
#
#   scripts/check-space.sh [--reuse | --fresh] [--torch-wheel PATH] [--port N] [--keep]
#
# --fresh  pip installs torch and requirements.txt as the Dockerfile does (needs PyPI): torch from a wheel on disk
#          when one matches the pin (--torch-wheel, or /opt/wheels/torch-<pin>+cpu-*.whl: the CPU wheel the
#          Dockerfile would download), else from the PyTorch CPU index.
# --reuse  (the default: fast, and works without network) no downloads: the distributions requirements.txt names, and
#          the ones they require, recursively, are hard-linked from this Python's site-packages into the fresh
#          venv (the equivalent of `venv --system-site-packages`, which a non-root user cannot use here because
#          this Python lives under /root, mode 700). Only the requirement closure is linked, not the whole
#          site-packages, so an import the requirements do not cover fails here as it would in the image. pip then
#          resolves requirements.txt against them with --no-index (every pin must be met) and `pip check` runs.
# --torch-wheel PATH  install torch from a wheel on disk instead (e.g. /opt/wheels/torch-2.13.0+cpu-...whl, the
#          CPU wheel the Dockerfile would download); slower (it unpacks ~800 MB).
# The venv's interpreter is Debian's /usr/bin/python3.11 (the image's is python:3.11-slim's): readable by uid 1000.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

MODE=""; TORCH_WHEEL=""; PORT="${PORT:-7860}"; KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --reuse) MODE=reuse ;;
    --fresh) MODE=fresh ;;
    --torch-wheel) TORCH_WHEEL="$2"; shift ;;
    --port) PORT="$2"; shift ;;
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "check-space: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

START=$(date +%s)
say() { echo "check-space: [$(( $(date +%s) - START ))s] $*"; }
fail() { echo "check-space: FAILED: $*" >&2; exit 1; }

if command -v docker >/dev/null 2>&1 && timeout 10 docker info >/dev/null 2>&1; then
  say "a docker daemon answers here: 'docker build -t sparsevlm-explorer .' would check the image itself"
else
  say "docker cannot run on this machine (no daemon): the image is NOT built; checking the app outside docker"
fi

HOST_PY=$(command -v python3)  # the Python whose site-packages --reuse links from
VENV_PY=/usr/bin/python3.11
[ -x "$VENV_PY" ] || VENV_PY=$HOST_PY
MODE=${MODE:-reuse}
say "mode: $MODE"

# A free port: 7860 unless taken.
if ! "$HOST_PY" -c "import socket,sys; s=socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1])))" "$PORT" 2>/dev/null; then
  PORT=$("$HOST_PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  say "port 7860 is taken; using $PORT"
fi

WORK=$(mktemp -d /tmp/check-space.XXXXXX)
chmod 755 "$WORK"
APP_PID=""
cleanup() {
  if [ -n "$APP_PID" ] && kill -0 "$APP_PID" 2>/dev/null; then
    kill -TERM -- "-$APP_PID" 2>/dev/null || true
    for _ in $(seq 20); do kill -0 "$APP_PID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$APP_PID" 2>/dev/null || true
  fi
  if [ "$KEEP" = 1 ]; then say "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# 1. A fresh virtual environment with the Dockerfile's requirements.
"$VENV_PY" -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
TORCH_PIN=$(sed -n 's/^torch==\([^ ]*\).*/\1/p' requirements.txt)
if [ "$MODE" = fresh ]; then
  if [ -z "$TORCH_WHEEL" ]; then
    TORCH_WHEEL=$(ls /opt/wheels/torch-"$TORCH_PIN"+cpu-cp311-*.whl 2>/dev/null | head -1 || true)
    [ -n "$TORCH_WHEEL" ] && say "reusing the torch wheel on disk: $TORCH_WHEEL"
  fi
  if [ -n "$TORCH_WHEEL" ]; then "$PY" -m pip install -q "$TORCH_WHEEL"
  else "$PY" -m pip install -q "torch==$TORCH_PIN" --index-url https://download.pytorch.org/whl/cpu; fi
  "$PY" -m pip install -q -r requirements.txt
else
  "$HOST_PY" - "$SITE" "$TORCH_WHEEL" <<'EOF'
"""Hard-link the requirement closure of requirements.txt from this Python's site-packages into the venv's."""
import os
import shutil
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

target, torch_wheel = Path(sys.argv[1]), sys.argv[2]
todo = []
for line in Path("requirements.txt").read_text().splitlines():
    line = line.split("#")[0].strip()
    if line and not line.startswith("-"):
        todo.append(Requirement(line))
seen, missing = {}, []
while todo:
    req = todo.pop()
    key = req.name.lower().replace("_", "-")
    if key in seen or (req.marker and not req.marker.evaluate({"extra": ""})):
        continue
    try:
        dist = metadata.distribution(req.name)
    except metadata.PackageNotFoundError:
        missing.append(req.name)
        continue
    seen[key] = dist
    for r in dist.requires or []:
        r = Requirement(r)
        if not r.marker or r.marker.evaluate({"extra": ""}):
            todo.append(r)
if missing:
    sys.exit(f"not installed here, cannot reuse: {', '.join(missing)}")
linked = 0
for key, dist in sorted(seen.items()):
    if key == "torch" and torch_wheel:
        continue  # installed from the wheel below
    base = Path(dist.locate_file(""))
    for f in dist.files or []:
        src = Path(dist.locate_file(f))
        try:
            rel = src.resolve().relative_to(base.resolve())
        except ValueError:
            continue  # console scripts in bin/ and the like: not needed to import
        if not src.is_file():
            continue
        dst = target / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            continue
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
        linked += 1
print(f"check-space: linked {len(seen)} distributions ({linked} files) into the venv")
EOF
  if [ -n "$TORCH_WHEEL" ]; then "$PY" -m pip install -q --no-index --no-deps "$TORCH_WHEEL"; fi
  "$PY" -m pip install -q --no-index -r requirements.txt || fail "requirements.txt is not met by the reused packages"
fi
say "packages in place"
"$PY" -m pip check || fail "pip check found inconsistent dependencies"
say "requirements installed: torch $("$PY" -c 'import torch; print(torch.__version__)'), $("$PY" -m pip list --format=freeze 2>/dev/null | wc -l) distributions"

# 2. The image's contents: what `COPY . .` copies - every file of the build context, tracked by git or not, less
#    what .dockerignore excludes, read with Docker's own pattern rules (scripts/docker_context.py).
mkdir -p "$WORK/app" "$WORK/home"
say "$("$HOST_PY" scripts/docker_context.py . --copy-to "$WORK/app")"

# 3. Start it as the image's CMD does, as uid 1000, hub offline.
CMD=$("$HOST_PY" -c "
import json, re, sys
m = re.search(r'^CMD\s+(\[.*\])\s*$', open('Dockerfile').read(), re.M)
cmd = json.loads(m.group(1))
print(' '.join(sys.argv[1] if a == '7860' else a for a in cmd))" "$PORT")
# The image's own setting for a public server (ENV SPARSEVLM_PUBLIC in the Dockerfile).
PUBLIC=$(sed -n 's/^[[:space:]]*SPARSEVLM_PUBLIC=\([^[:space:]\\]*\).*/\1/p' Dockerfile | head -1)
say "starting: $CMD  (in $WORK/app, SPARSEVLM_PUBLIC=${PUBLIC:-unset})"
RUN_AS=()
if [ "$(id -u)" = 0 ]; then
  chown -R 1000:1000 "$WORK/app" "$WORK/home"
  RUN_AS=(setpriv --reuid=1000 --regid=1000 --clear-groups)
  say "running as uid 1000 (like a Space), not root"
else
  say "running as $(id -un) (uid $(id -u)), not root"
fi
( cd "$WORK/app" && exec setsid env -i PATH="$WORK/venv/bin:/usr/bin:/bin" HOME="$WORK/home" \
    HF_HOME="$WORK/home/.cache/huggingface" GRADIO_TEMP_DIR="$WORK/home/.cache/gradio" \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False \
    PYTHONUNBUFFERED=1 PORT="$PORT" ${PUBLIC:+SPARSEVLM_PUBLIC="$PUBLIC"} "${RUN_AS[@]}" $CMD ) >"$WORK/app.log" 2>&1 &
APP_PID=$!

# 4. The page and the API must answer.
URL="http://127.0.0.1:$PORT"
for i in $(seq 240); do
  if curl -fsS -o "$WORK/page.html" "$URL/" 2>/dev/null; then break; fi
  kill -0 "$APP_PID" 2>/dev/null || { tail -20 "$WORK/app.log" >&2; fail "the app exited before answering"; }
  sleep 1
  [ "$i" = 240 ] && { tail -20 "$WORK/app.log" >&2; fail "no answer on $URL after 240 s"; }
done
grep -qi "gradio" "$WORK/page.html" || fail "$URL/ answered, but not with the Gradio page"
say "page answers on $URL/ ($(wc -c <"$WORK/page.html") bytes)"
"$PY" - "$URL" "$ROOT" <<'EOF' || fail "the API did not answer as expected"
import json
import sys
import urllib.request

url, root = sys.argv[1], sys.argv[2]
info = json.load(urllib.request.urlopen(f"{url}/gradio_api/info", timeout=30))
named = sorted(info.get("named_endpoints", {}))
assert named, "the API lists no named endpoints"
print(f"check-space: API answers: {len(named)} named endpoints ({', '.join(named[:8])}{' ...' if len(named) > 8 else ''})")
if "/run" in named:
    from gradio_client import Client, handle_file

    params = info["named_endpoints"]["/run"]["parameters"]
    kwargs = {}
    for p in params:
        name, comp = p["parameter_name"], p.get("component", "")
        if comp == "Image" or "image" in name:
            kwargs[name] = handle_file(f"{root}/assets/examples/01-colour.png")
        elif "question" in name:
            kwargs[name] = "What colour is the triangle?"
        elif not p.get("parameter_has_default"):
            sys.exit(f"/run parameter {name} has no default; this check does not know what to pass")
    out = Client(url, verbose=False).predict(**kwargs, api_name="/run")
    text = json.dumps(out, default=str)
    assert "answer" in text, f"/run returned no answer: {text[:200]}"
    print("check-space: /run answered with a trace")
else:
    print("check-space: this build has no /run endpoint; the info endpoint answered")
EOF
say "OK: the app answered as uid $([ "$(id -u)" = 0 ] && echo 1000 || id -u) with the hub offline; stopping it"

"""A server that is safe to host publicly: what a visitor may make it load, and what its messages give away.

Local model folders load only from the model roots (assets/models, $SPARSEVLM_MODELS_DIR) and the folder named at
start; any other path gets one message, the same whether it exists or not. Overlong and malformed names get a clear
message. A public server (`--public`, SPARSEVLM_PUBLIC=1) also downloads no hub model beyond the presets.
Checked in-process on `sparsevlm.loading.resolve`, through the CLIs, and through the Gradio API of a real server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from sparsevlm.errors import ModelLoadError
from sparsevlm.loading import MAX_NAME_CHARS, ModelAccess, resolve
from sparsevlm.presets import PRESETS

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client
from gradio_client.exceptions import AppError
from test_app_api import free_port, save_tiny

REPO = Path(__file__).resolve().parent.parent
REFUSED = "is not a model this server offers"
LONG_NAME = "m" * 5000


def refusal(call) -> str:
    """The message of a refused name, from the part after the echoed name on (the name itself differs)."""
    with pytest.raises((ModelLoadError, AppError)) as err:
        call()
    msg = str(err.value)
    assert REFUSED in msg and "Traceback" not in msg, msg
    return msg.split(REFUSED, 1)[1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A real model folder named at start, one under a model root, and a copy outside every root."""
    root = tmp_path_factory.mktemp("public")
    start = root / "start" / "tiny-llava"
    save_tiny(start, "llama")
    shutil.copytree(start, root / "models" / "tiny-extra")
    shutil.copytree(start, root / "private" / "tiny-copy")
    (root / "private" / "notes").mkdir()
    (root / "private" / "notes" / "id_rsa").write_text("not a key")
    return {"root": root, "start": start, "extra": root / "models" / "tiny-extra",
            "outside": root / "private" / "tiny-copy", "secret_dir": root / "private" / "notes",
            "missing": root / "private" / "no-such-folder"}


@pytest.fixture
def access(folders, monkeypatch) -> ModelAccess:
    monkeypatch.setenv("SPARSEVLM_MODELS_DIR", str(folders["root"] / "models"))
    return ModelAccess.for_server(str(folders["start"]))


# --- the rules, in-process -----------------------------------------------------------------------------------
def test_roots_and_the_start_folder_load(access, folders):
    assert resolve(str(folders["start"]), access) == folders["start"].resolve()
    assert resolve(str(folders["extra"]), access) == folders["extra"].resolve()
    assert resolve("scenes-llava", access) is PRESETS["scenes-llava"]  # presets always
    assert resolve(str(REPO / "assets/models/scenes-llava"), access) is PRESETS["scenes-llava"]
    assert resolve("owner/some-llava", access) == "owner/some-llava"  # hub ids, unless the server is public


def test_other_paths_get_one_message_whether_they_exist_or_not(access, folders):
    tails = {name: refusal(lambda n=name: resolve(n, access)) for name in (
        str(folders["outside"]),  # a real LLaVA folder, outside every root
        str(folders["secret_dir"]),  # an existing folder without config.json
        str(folders["missing"]),
        "~/.ssh", "/etc", "/no/such/folder", "relative/../path",
        str(folders["extra"]) + "/../../private/tiny-copy",  # out of a root by '..'
        str(folders["root"] / "models"),  # the root itself is no model
    )}
    assert len(set(tails.values())) == 1, tails
    tail = next(iter(tails.values()))
    assert "exist" not in tail and "config.json" not in tail and "model folders" in tail


def test_without_rules_every_folder_still_loads(folders):
    """Code and the command line name their own folders: no access rules, the precise messages."""
    assert resolve(str(folders["outside"])) == folders["outside"].resolve()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        resolve(str(folders["secret_dir"]))
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve(str(folders["missing"]))


@pytest.mark.parametrize("name,needle", [
    (LONG_NAME, f"5,000 characters long; at most {MAX_NAME_CHARS:,}"),
    ("/tmp/" + "d" * 300 + "/model", "part of 300 bytes"),
    ("owner/model\n", None),  # trailing white space is stripped: a valid hub id
    ("tiny\x00llava", "control characters"),
    ("tiny\tllava", "control characters"),
    ("owner/bad!name", "neither a preset, a local model folder nor a hub id"),
    ("owner/a--b", "neither a preset, a local model folder nor a hub id"),
    ("   ", "no model was given"),
])
def test_overlong_and_malformed_names_get_a_clear_message(name, needle, access):
    for rules in (None, access):
        if needle is None:
            assert resolve(name, rules) == name.strip()
            continue
        with pytest.raises(ModelLoadError, match=needle) as err:
            resolve(name, rules)
        assert "OSError" not in str(err.value) and len(str(err.value)) < 600


def _cache_a_hub_model(cache: Path, hub_id: str, config: Path) -> None:
    """A model in the Hugging Face cache layout (models--owner--name/refs/main -> snapshots/<commit>/)."""
    repo = cache / ("models--" + hub_id.replace("/", "--"))
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    shutil.copy(config, repo / "snapshots" / commit / "config.json")


def test_public_rules_refuse_hub_ids_beyond_presets_and_cache(folders, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    _cache_a_hub_model(tmp_path, "owner/cached-llava", folders["start"] / "config.json")
    public = ModelAccess.for_server(str(folders["start"]), "owner/started-llava", public=True)
    assert resolve("owner/cached-llava", public) == "owner/cached-llava"  # a local model
    assert resolve("owner/started-llava", public) == "owner/started-llava"  # named at start
    assert resolve("llava-hf/llava-1.5-7b-hf", public) is PRESETS["llava-hf/llava-1.5-7b-hf"]
    assert "downloads no other hub model" in refusal(lambda: resolve("owner/uncached-llava", public))
    assert resolve("owner/uncached-llava", ModelAccess.for_server(public=False)) == "owner/uncached-llava"


def test_a_relative_start_folder_with_one_slash_is_a_folder(folders, monkeypatch):
    """`python -m app --model start/tiny-llava` run from the folder above: a folder here, not a hub id."""
    monkeypatch.chdir(folders["root"])
    access = ModelAccess.for_server("start/tiny-llava", "owner/started-llava", public=True)
    assert resolve("start/tiny-llava", access) == folders["start"].resolve()
    assert resolve("owner/started-llava", access) == "owner/started-llava"


def test_public_setting_from_the_environment(monkeypatch):
    for value, public in (("1", True), ("true", True), ("on", True), ("0", False), ("", False)):
        monkeypatch.setenv("SPARSEVLM_PUBLIC", value)
        assert ModelAccess.for_server().public is public
    assert ModelAccess.for_server(public=False).public is False  # the flag wins


# --- the command lines ---------------------------------------------------------------------------------------
def test_cli_overlong_model_name_is_one_line(tmp_path, capsys):
    from sparsevlm.cli import main

    Image.new("RGB", (40, 30), "red").save(tmp_path / "x.png")
    code = main(["run", "--model", LONG_NAME, "--image", str(tmp_path / "x.png"), "--question", "q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "5,000 characters long" in err[0]


def test_app_start_refuses_an_overlong_model_name_in_one_line(capsys):
    from app.__main__ import main

    assert main(["--model", LONG_NAME, "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "5,000 characters long" in err[0] and "OSError" not in err[0]


# --- a real public server, through the Gradio API ------------------------------------------------------------
@pytest.fixture(scope="module")
def server(folders):
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log = folders["root"] / "server.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
           "SPARSEVLM_MODELS_DIR": str(folders["root"] / "models")}
    env.pop("SPARSEVLM_PUBLIC", None)  # the flag alone makes it public
    proc = subprocess.Popen([sys.executable, "-m", "app", "--public", "--model", str(folders["start"]),
                             "--port", str(port), "--examples", str(folders["root"] / "no-examples.json"),
                             "--model-memory-gib", "100"],  # room for a 7B preset: it gets as far as the hub
                            cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, log.read_text()[-3000:]
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        yield url, Client(url, verbose=False)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_public_page_offers_presets_and_local_models(server, folders):
    url, _ = server
    config = json.loads(urllib.request.urlopen(url + "config", timeout=30).read())
    picker = next(c["props"] for c in config["components"] if c["props"].get("elem_id") == "sv-model-picker")
    assert picker["label"] == "Model: a preset or a local model"
    offered = [c[1] if isinstance(c, list) else c for c in picker["choices"]]
    assert str(folders["extra"]) in offered and "llava-hf/llava-1.5-7b-hf" in offered


def test_public_server_loads_from_its_roots_only(server, folders):
    _, client = server
    line, _ = client.predict(str(folders["extra"]), api_name="/load_model")
    assert "tiny-extra" in line and "loaded in" in line
    line, _ = client.predict(str(folders["start"]), api_name="/load_model")  # named at start
    assert "tiny-llava" in line
    tails = {name: refusal(lambda n=name: client.predict(n, api_name="/load_model")) for name in (
        str(folders["outside"]), str(folders["secret_dir"]), str(folders["missing"]), "~/.ssh", "/etc/passwd",
        str(folders["extra"]) + "/../../private/tiny-copy")}
    assert len(set(tails.values())) == 1, tails
    assert "exist" not in next(iter(tails.values()))


@pytest.mark.parametrize("name,needle", [
    (LONG_NAME, "5,000 characters long"),
    ("tiny\x00llava", "control characters"),
    ("/" + "d" * 300, "part of 300 bytes"),
    ("owner/bad name!", REFUSED),  # a space: read as a path
    ("owner/bad!name", "neither a preset, a local model folder nor a hub id"),
    ("owner/a--b", "neither a preset, a local model folder nor a hub id"),
    ("nobody/some-llava", "downloads no other hub model"),  # refused before any download is tried
    ("llava-1.5-7b-hf", "the hub is offline"),  # a preset is allowed; this server is offline
])
def test_public_server_names_bad_or_refused_names_clearly(server, name, needle):
    url, client = server
    with pytest.raises(AppError, match=needle) as err:
        client.predict(name, api_name="/load_model")
    msg = str(err.value)
    assert "Traceback" not in msg and "OSError" not in msg and "Something went wrong" not in msg
    assert urllib.request.urlopen(url, timeout=10).status == 200

"""Adding a method is one class and one registration: a toy method defined here runs through `run()`, the CLI's
JSON, the trace and the app's renderers with no other file touched; the tables read the registry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from app import render
from sparsevlm import cli, schedule
from sparsevlm.config import PruneConfig
from sparsevlm.errors import ConfigError
from sparsevlm.loading import from_objects
from sparsevlm.methods import (
    METHOD_LABELS,
    METHODS,
    ModelGeometry,
    Plan,
    PruneMethod,
    Selection,
    StageInput,
    StageSpec,
    get_method,
    register,
    unregister,
)
from sparsevlm.pipeline import run
from sparsevlm.testing import tiny_llava
from sparsevlm.trace import PruneTrace


class LoudestPatches(PruneMethod):
    """Keeps the k patches whose projector features have the largest norm, before the LLM."""

    name, label, ranks_by = "toy-loudest", "Loudest patches", "feature norm"

    def plan(self, cfg: PruneConfig, geo: ModelGeometry) -> Plan:
        counts = schedule.single_stage(cfg, geo.grid_tokens, -1, geo.depth, self.label)
        return Plan((StageSpec(-1, counts.direct[0]),), self.positions(cfg), counts=counts, note=counts.note)

    def select(self, cfg: PruneConfig, inp: StageInput) -> Selection:
        scores = inp.projector.float().norm(dim=-1)
        keep = torch.topk(scores, inp.spec.keep).indices.sort().values
        return Selection(keep, scores, f"keep the {inp.spec.keep} of {inp.visual} patches with the largest norm")


@pytest.fixture()
def toy():
    method = register(LoudestPatches())
    yield method
    unregister(method.name)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    model, processor = tiny_llava("llama", layers=8, image_size=112)
    d = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(d)
    processor.save_pretrained(d)
    image = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (110, 150, 3), dtype=np.uint8)).save(image)
    return from_objects(model, processor), d, image


def test_a_method_defined_here_runs_everywhere(toy, tiny_dir, capsys):
    lm, folder, image_path = tiny_dir
    assert toy.name in METHODS and METHOD_LABELS[toy.name] == "Loudest patches"
    assert render.RANKS_BY[toy.name] == "feature norm"
    assert render.method_label(toy.name, long=True) == "Loudest patches (feature norm)"

    image = Image.open(image_path).convert("RGB")
    tr = run(lm, image, "what colour is the shape ?", PruneConfig(method=toy.name, budget=12), max_new_tokens=3).trace
    assert tr.method == toy.name and len(tr.stages) == 1 and len(tr.stages[0].kept) == 12
    assert all(layer.visual_in == 12 for layer in tr.layers) and tr.cost.budget_met
    again = PruneTrace.from_json(tr.to_json())
    assert again.stages[0].kept == tr.stages[0].kept and again.stages[0].formula.startswith("keep the 12")

    assert cli.main(["run", "--model", str(folder), "--image", str(image_path), "--question", "what colour ?",
                     "--method", toy.name, "--budget", "12", "--max-new-tokens", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == toy.name and out["equal_tokens"] == 12.0
    assert cli.main(["methods", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[toy.name]["ranks_by"] == "feature norm" and rows[toy.name]["needs_cls"] is False

    picture = render.render_layer(image, tr, render.final_layer(tr))
    assert picture.size[0] > 0
    assert "with the largest norm" in render.formulas_markdown(tr)
    assert render.counts_figure(tr, budget=12).data
    assert render.latency_rows(tr, None)
    row = render.compare_rows([(toy.name, tr, "")])[0]
    assert row[0] == "Loudest patches" and "budget 12 met" in row[4]


def test_registry_refuses_a_taken_name_and_forgets_what_it_added(toy):
    with pytest.raises(ConfigError, match="registered already"):
        register(LoudestPatches())
    with pytest.raises(ConfigError, match="built-in"):
        unregister("sparsevlm")
    unregister(toy.name)
    assert toy.name not in METHODS
    with pytest.raises(ConfigError, match="unknown method"):
        get_method(toy.name)
    register(toy)  # the fixture removes it again


def test_each_method_declares_what_the_tables_show():
    for name in METHODS:
        m = get_method(name)
        assert m.name == name and m.label and (m.ranks_by or name == "dense"), name
        assert m.captures <= {"attention", "vision"}, name
        assert m.needs_cls == ("vision" in m.captures), name  # the [CLS] row is read from the vision layer
    assert dict(render.RANKS_BY) == {name: get_method(name).ranks_by for name in METHODS}

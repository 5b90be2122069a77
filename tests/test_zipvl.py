"""ZipVL: the rules on hand-built scores, and the whole prefill and decoding against a plain loop over the layers
written from the specification (not from the engine's code), on a tiny random LLaVA in float64."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparsevlm.config import PruneConfig
from sparsevlm.errors import ConfigError
from sparsevlm.hooks import PruneHooks
from sparsevlm.loading import from_objects
from sparsevlm.methods.zipvl import attended_set, mass_curve, normalized, probe_positions, tau_count, visible_counts
from sparsevlm.pipeline import build_prompt, run
from sparsevlm.testing import tiny_llava

ROOT = Path(__file__).resolve().parent.parent


# --- the rules on hand-built scores --------------------------------------------------------------------------------
def test_tau_rule_exact_at_the_boundary():
    s = torch.tensor([1.0, 4.0, 1.0, 2.0])  # sorted 4, 2, 1, 1: cumulative shares 0.5, 0.75, 0.875, 1
    assert tau_count(s, 0.5) == 1
    assert tau_count(s, 0.75) == 2  # reached exactly by two tokens
    assert tau_count(s, 0.7500001) == 3
    assert tau_count(s, 0.875) == 3
    assert tau_count(s, 1.0) == 4
    assert tau_count(torch.tensor([3.0, 0.0, 0.0]), 1.0) == 1  # tokens holding no mass are never needed
    assert tau_count(torch.zeros(5), 0.9) == 5
    with pytest.raises(ConfigError):
        tau_count(s, 0.0)
    with pytest.raises(ConfigError):
        tau_count(s, 1.5)


def test_normalization_divides_by_the_queries_that_see_each_token():
    assert visible_counts(5, None).tolist() == [5, 4, 3, 2, 1]
    # probe rows at 2, 4, 4 (drawn with replacement): rows at positions >= j
    assert visible_counts(5, torch.tensor([2, 4, 4])).tolist() == [3, 3, 3, 2, 2]
    a = torch.tensor([10.0, 8.0, 3.0, 2.0, 1.0])
    assert normalized(a, visible_counts(5, None)).tolist() == [2.0, 2.0, 1.0, 1.0, 1.0]


def test_count_from_accumulated_choice_from_normalized_and_last_kept():
    a = torch.tensor([[10.0, 8.0, 3.0, 2.0, 1.0, 0.5]])
    p = tau_count(a[0], 0.75)  # 10 + 8 = 18 of 24.5 = 0.73 < 0.75; + 3 = 0.86
    assert p == 3
    norm = normalized(a, visible_counts(6, None)[None])  # 10/6, 8/5, 3/4, 2/3, 1/2, 0.5/1
    t, forced = attended_set(norm, p)
    assert t.tolist() == [[0, 1, 2, 5]] and forced  # top 3 by normalized score, then the last position added
    b = torch.tensor([[10.0, 8.0, 3.0, 2.0, 1.0, 0.9]])  # the last's 0.9 / 1 beats 3 / 4
    t, forced = attended_set(normalized(b, visible_counts(6, None)[None]), 3)
    assert t.tolist() == [[0, 1, 5]] and not forced
    per_head = torch.tensor([[5.0, 1.0, 4.0, 0.0], [0.0, 6.0, 1.0, 0.1]])
    t, forced = attended_set(per_head, 2)
    assert t.tolist() == [[0, 3], [1, 3]] and forced  # per head, the last sits inside each head's p


def test_probe_positions_recent_and_random_before_them():
    gen = torch.Generator().manual_seed(0)
    rows = probe_positions(300, 64, 64, gen)
    assert rows.numel() == 128 and rows.tolist() == sorted(rows.tolist())
    assert rows[-64:].tolist() == list(range(236, 300))
    assert (rows[:64] < 236).all()
    assert probe_positions(50, 64, 64, torch.Generator().manual_seed(0)).tolist() == list(range(50))
    again = probe_positions(300, 64, 64, torch.Generator().manual_seed(0))
    assert torch.equal(rows, again)  # seeded


def test_mass_curve_reads_p_off():
    s = torch.tensor([1.0, 4.0, 1.0, 2.0])
    ranks, mass = mass_curve(s)
    assert ranks == [1, 2, 3, 4] and mass == [0.5, 0.75, 0.875, 1.0]


def test_bad_options_are_clear():
    with pytest.raises(ConfigError, match="tau must lie in"):
        PruneConfig(method="zipvl", budget=8, tau=1.2).validate()
    with pytest.raises(ConfigError, match="tau must lie in"):
        PruneConfig(method="zipvl", budget=8, tau=0).validate()
    with pytest.raises(ConfigError, match="probes must be one of"):
        PruneConfig(method="zipvl", budget=8, probes="some").validate()
    with pytest.raises(ConfigError, match="zipvl has no option 'lam'"):
        PruneConfig(method="zipvl", budget=8, lam=0.5).validate()


@pytest.mark.parametrize("args, says", [
    (["--tau", "1.5"], "zipvl option tau must lie in (0, 1]"),
    (["--tau", "abc"], "zipvl option tau must be a number"),
    (["--probes", "some"], "zipvl option probes must be one of recent+random, all, both"),
    (["--count-mode", "paper"], "zipvl has no option 'count_mode'"),
])
def test_cli_bad_options_one_line(tmp_path, args, says):
    img = tmp_path / "a.png"
    Image.new("RGB", (40, 30), "red").save(img)
    out = subprocess.run([sys.executable, "-m", "sparsevlm", "run", "--image", str(img), "--question", "what ?",
                          "--method", "zipvl", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"error: {out.stderr.strip()[7:]}"]
    assert says in out.stderr and "Traceback" not in out.stderr


# --- the whole prefill and decoding against a plain loop -------------------------------------------------------
def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class Reference:
    """ZipVL written from the specification with every probe row: per layer the full causal attention (float64),
    a_j = column sums over heads and rows, p = the smallest count whose largest a reach tau of the total,
    normalized a_j / (n - j), T = top-p normalized plus the last position; attention among T only (zero output
    elsewhere), the MLP on every token; the cache keeps T's keys and values."""

    def __init__(self, model, tau):
        self.model, self.tau = model, tau
        self.lm = model.model.language_model
        self.cfg = model.config.text_config

    def embed(self, inputs):
        llava = self.model.model
        ids = inputs["input_ids"]
        emb = llava.get_input_embeddings()(ids)
        feats = llava.get_image_features(pixel_values=inputs["pixel_values"].double(), return_dict=True)
        mask = ids[0] == self.model.config.image_token_id
        pooled = feats.pooler_output
        pooled = torch.cat(list(pooled)) if isinstance(pooled, list | tuple) else pooled
        emb[0, mask] = pooled.reshape(-1, emb.shape[-1]).to(emb.dtype)
        return emb

    def heads(self, layer, x, pos):
        at = layer.self_attn
        hd = at.head_dim
        h = layer.input_layernorm(x)
        q = at.q_proj(h).view(x.shape[0], -1, hd).transpose(0, 1)
        k = at.k_proj(h).view(x.shape[0], -1, hd).transpose(0, 1)
        v = at.v_proj(h).view(x.shape[0], -1, hd).transpose(0, 1)
        cos, sin = self.lm.rotary_emb(x[None], pos[None])
        q, k = _rope(q, cos[0], sin[0]), _rope(k, cos[0], sin[0])
        groups = q.shape[0] // k.shape[0]
        return q, k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0), k, v

    def finish(self, layer, x, attn_out):
        x = x + layer.self_attn.o_proj(attn_out)
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def prefill(self, inputs):
        x = self.embed(inputs)[0]
        n = x.shape[0]
        pos = torch.arange(n)
        sets, cache = [], []
        for layer in self.lm.layers:
            q, k, v, k_kv, v_kv = self.heads(layer, x, pos)
            scores = (q @ k.transpose(1, 2)) * layer.self_attn.scaling
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            a = torch.softmax(scores, dim=-1).sum(dim=(0, 1))
            ordered = torch.sort(a, descending=True).values.cumsum(0)
            p = next(i + 1 for i in range(n) if ordered[i] >= self.tau * ordered[-1])
            norm = a / torch.arange(n, 0, -1, dtype=a.dtype)
            t = sorted(set(torch.topk(norm, p).indices.tolist()) | {n - 1})
            sets.append(t)
            idx = torch.tensor(t)
            out = torch.zeros(n, q.shape[0], v.shape[-1], dtype=x.dtype)
            for row, i in enumerate(t):
                keys = idx[: row + 1]
                w = torch.softmax((q[:, i : i + 1] @ k[:, keys].transpose(1, 2)) * layer.self_attn.scaling, -1)
                out[i] = (w @ v[:, keys])[:, 0]
            x = self.finish(layer, x, out.reshape(n, -1))
            cache.append((k_kv[:, idx], v_kv[:, idx]))
        return self.logits(x), sets, cache

    def logits(self, x):
        return self.model.lm_head(self.lm.norm(x))

    def decode(self, token, position, cache):
        x = self.lm.embed_tokens(torch.tensor([token]))
        pos = torch.tensor([position])
        for li, layer in enumerate(self.lm.layers):
            _, _, _, k_new, v_new = self.heads(layer, x, pos)
            ck, cv = cache[li]
            ck, cv = torch.cat([ck, k_new], 1), torch.cat([cv, v_new], 1)
            cache[li] = (ck, cv)
            at = layer.self_attn
            q = _rope(at.q_proj(layer.input_layernorm(x)).view(1, -1, at.head_dim).transpose(0, 1),
                      *(c[0] for c in self.lm.rotary_emb(x[None], pos[None])))
            groups = q.shape[0] // ck.shape[0]
            k, v = ck.repeat_interleave(groups, 0), cv.repeat_interleave(groups, 0)
            w = torch.softmax((q @ k.transpose(1, 2)) * at.scaling, -1)
            x = self.finish(layer, x, (w @ v).transpose(0, 1).reshape(1, -1))
        return self.logits(x)[0]


@pytest.fixture(scope="module")
def tiny64():
    model, processor = tiny_llava("llama", layers=4, image_size=56, dtype=torch.float64)
    image = Image.fromarray(np.random.RandomState(3).randint(0, 255, (50, 60, 3), dtype=np.uint8))
    inputs = processor(images=image, text=build_prompt(processor, "what colour is the shape ?"), return_tensors="pt")
    return model, processor, image, inputs


@torch.no_grad()
@pytest.mark.parametrize("tau", [0.9, 0.975])
def test_prefill_equals_the_plain_loop(tiny64, tau):
    model, _, _, inputs = tiny64
    want_logits, want_sets, _ = Reference(model, tau).prefill(inputs)
    cfg = PruneConfig(method="zipvl", budget=8, tau=tau, probes="all")
    with PruneHooks(model, cfg) as hooks:
        got = model(**{k: (v.double() if k == "pixel_values" else v) for k, v in inputs.items()}).logits[0]
    got_sets = [a.attended for a in hooks.record().attention]
    assert got_sets == want_sets
    assert any(len(s) < inputs["input_ids"].shape[1] for s in want_sets)  # the rule did leave tokens out
    assert torch.allclose(got, want_logits, atol=1e-10, rtol=0)
    dense = model(**{k: (v.double() if k == "pixel_values" else v) for k, v in inputs.items()}).logits[0]
    assert not torch.allclose(dense, want_logits, atol=1e-6)  # and that changed the output


@torch.no_grad()
def test_generation_with_evicted_caches_equals_the_plain_loop(tiny64):
    model, processor, image, _ = tiny64
    lm = from_objects(model, processor, "tiny64")
    lm.dtype = torch.float64
    steps = 4
    result = run(lm, image, "what colour is the shape ?", PruneConfig(method="zipvl", budget=8, tau=0.9, probes="all"),
                 max_new_tokens=steps)
    inputs = processor(images=image, text=build_prompt(processor, "what colour is the shape ?"), return_tensors="pt")
    ref = Reference(model, 0.9)
    logits, sets, cache = ref.prefill(inputs)
    n = inputs["input_ids"].shape[1]
    tokens = [int(logits[-1].argmax())]
    for t in range(1, steps):
        tokens.append(int(ref.decode(tokens[-1], n + t - 1, cache).argmax()))
    want = processor.decode(tokens, skip_special_tokens=True).strip()
    assert result.answer == want
    assert [a.attended for a in result.trace.attention] == sets
    # Each layer's cache right after the prefill holds exactly that layer's attended tokens (read off the cache).
    assert result.trace.memory.kv_tokens_per_layer == [len(s) for s in sets]


@torch.no_grad()
def test_per_layer_cache_lengths_while_decoding(tiny64):
    model, _, _, inputs = tiny64
    lengths = []

    def probe(module, args, output):
        lengths.append([layer.keys.shape[-2] for layer in output.past_key_values.layers])

    handle = model.register_forward_hook(probe)
    try:
        with PruneHooks(model, PruneConfig(method="zipvl", budget=8, tau=0.9)) as hooks:
            model.generate(**{k: (v.double() if k == "pixel_values" else v) for k, v in inputs.items()},
                           max_new_tokens=4, do_sample=False)
    finally:
        handle.remove()
    sets = [len(a.attended) for a in hooks.record().attention]
    assert lengths[0] == sets
    for step, row in enumerate(lengths[1:], start=1):
        assert row == [s + step for s in sets]  # one new entry per decode step on every layer


@torch.no_grad()
def test_probe_rows_and_both_record_the_overlap(tiny64):
    model, processor, image, _ = tiny64
    lm = from_objects(model, processor, "tiny64")
    cfg = PruneConfig(method="zipvl", budget=8, probes="both", recent=8, random=8)
    tr = run(lm, image, "what colour is the shape ?", cfg, max_new_tokens=1).trace
    for a in tr.attention:
        full = a.extras["full"]
        assert 0 <= full["overlap"] <= min(len(a.attended), full["attended"])
        assert 0.0 <= full["recall"] <= 1.0
        assert len(a.extras["probes"]) == 16
    s = json.loads(tr.to_json())
    assert s["attention"][0]["extras"]["full"]["p"] >= 1
    summary = tr.summary()["attention"]
    assert 0 < summary["attended_share"] <= 1
    assert summary["kv_tokens_per_layer"] == [len(a.attended) for a in tr.attention]


@torch.no_grad()
def test_cost_counts_what_runs(tiny64):
    from sparsevlm import cost as C

    model, processor, image, _ = tiny64
    lm = from_objects(model, processor, "tiny64")
    cfg = PruneConfig(method="zipvl", budget=8, tau=0.9)
    tr = run(lm, image, "what colour is the shape ?", cfg, max_new_tokens=1).trace
    shape = C.DecoderShape.from_config(model.config)
    n = tr.attention[0].n
    want = sum(C.layer_flops(n, shape, len(a.attended)) + C.probe_flops(len(a.extras["probes"]), n, shape)
               for a in tr.attention)
    assert tr.cost.prefill_flops == pytest.approx(want)
    assert tr.cost.prefill_flops < tr.cost.prefill_flops_dense
    bpv = C.bytes_per_value(str(lm.dtype))
    assert tr.cost.kv_bytes == C.kv_bytes([len(a.attended) for a in tr.attention], shape, bpv)
    assert tr.cost.budget_met is None and "no budget" in tr.cost.budget_note


def test_an_architecture_the_engine_does_not_run_gets_one_clear_message(tmp_path):
    """A folder of another vision-language architecture (here Qwen2-VL's config) gets one line naming what the
    engine runs, no traceback."""
    from transformers import Qwen2VLConfig

    folder = tmp_path / "other"
    folder.mkdir()
    Qwen2VLConfig().save_pretrained(folder)
    out = subprocess.run([sys.executable, "-m", "sparsevlm", "run", "--model", str(folder), "--image",
                          str(ROOT / "assets/examples/01-colour.png"), "--question", "what ?"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert "qwen2_vl" in out.stderr and "LlavaForConditionalGeneration" in out.stderr
    assert "LlavaNextForConditionalGeneration" in out.stderr


# --- options: declared once, generated everywhere, older settings still load ---------------------------------------
@pytest.mark.parametrize("name", ["trace-flat-config-sparsevlm.json", "trace-flat-config-fastv.json"])
def test_traces_written_with_flat_settings_load_and_rerun_the_same(name):
    """These traces were written by `python -m sparsevlm run --trace-out` when every setting was a flat field of
    PruneConfig (SparseVLM --mode paper --lam 0.5 --no-recycle; FastV --fastv-k 3 --budget 96): they load, their
    config moves into the method's options, and running it again makes the same decisions."""
    from sparsevlm.loading import load_model
    from sparsevlm.trace import PruneTrace

    old = PruneTrace.from_json((ROOT / "tests" / "data" / name).read_text())
    cfg = PruneConfig.from_dict(old.config).validate()
    if old.method == "sparsevlm":
        assert cfg.options["count_mode"] == "paper" and cfg.lam == 0.5 and cfg.recycle is False
    else:
        assert cfg.options == {"fastv_k": 3} and cfg.budget == 96
    lm = load_model(str(ROOT / "assets" / "models" / "scenes-llava"))
    new = run(lm, Image.open(ROOT / "assets" / "examples" / "01-colour.png"), old.question, cfg,
              max_new_tokens=2).trace
    assert [(s.after_layer, s.kept, s.visual_out) for s in new.stages] == \
        [(s.after_layer, s.kept, s.visual_out) for s in old.stages]
    assert new.answer == old.answer


def test_a_registered_method_gets_its_flags_from_its_declaration():
    from sparsevlm.cli import build_parser, chosen_options
    from sparsevlm.methods import register, unregister
    from sparsevlm.methods.dense import Dense
    from sparsevlm.options import Option

    class Knob(Dense):
        name = "knob-test"
        label = "Knob"
        options = (Option("knob_level", 3, "how much", kind="int", low=1, high=9),)

    register(Knob())
    try:
        a = build_parser().parse_args(["run", "--image", "x.png", "--question", "q", "--method", "knob-test",
                                       "--knob-level", "7"])
        cfg = PruneConfig(method=a.method, options=chosen_options(a)).validate()
        assert cfg.knob_level == 7
        with pytest.raises(ConfigError, match=r"knob-test option knob_level must lie in \[1, 9\]"):
            PruneConfig(method="knob-test", knob_level=12).validate()
    finally:
        unregister("knob-test")


def test_options_read_for_the_chosen_method():
    assert PruneConfig(method="zipvl").tau == 0.975
    assert PruneConfig(method="sparsevlm").tau == 0.3
    assert PruneConfig(method="zipvl", tau=0.96).to_dict()["options"]["tau"] == 0.96
    with pytest.raises(AttributeError):
        getattr(PruneConfig(method="fastv"), "tau")  # noqa: B009 - the attribute read is the test


# --- tau fitted to the budget ---------------------------------------------------------------------------------------
@torch.no_grad()
def test_tau_fitted_to_the_budget_and_cannot_meet(tiny64):
    model, processor, image, _ = tiny64
    lm = from_objects(model, processor, "tiny64")
    q = "what colour is the shape ?"
    tr = run(lm, image, q, PruneConfig(method="zipvl", budget=8, fit="budget"), max_new_tokens=1).trace
    assert tr.cost.budget == 8 and tr.cost.budget_counting == "attended"
    assert tr.cost.budget_figure == pytest.approx(sum(a.visual for a in tr.attention) / len(tr.attention))
    assert tr.cost.budget_met == (abs(tr.cost.budget_figure - 8) <= 1.0)
    assert tr.notes[0].startswith("ZipVL's rule, τ fitted to the budget")
    plain = run(lm, image, q, PruneConfig(method="zipvl", budget=8), max_new_tokens=1).trace
    assert plain.cost.budget is None and plain.cost.budget_met is None
    with pytest.raises(ConfigError, match="ZipVL cannot meet a flops budget of 2 tokens"):
        run(lm, image, q, PruneConfig(method="zipvl", budget=2, accounting="flops", fit="budget"), max_new_tokens=1)


@torch.no_grad()
def test_the_seam_runs_eager_attention_the_same(tiny64):
    model, _, _, inputs = tiny64
    batch = {k: (v.double() if k == "pixel_values" else v) for k, v in inputs.items()}
    with PruneHooks(model, PruneConfig(method="zipvl", budget=8, tau=0.9, probes="all")) as hooks:
        sdpa = model(**batch).logits
    sets = [a.attended for a in hooks.record().attention]
    model.set_attn_implementation("eager")
    try:
        with PruneHooks(model, PruneConfig(method="zipvl", budget=8, tau=0.9, probes="all")) as hooks:
            eager = model(**batch).logits
    finally:
        model.set_attn_implementation("sdpa")
    assert [a.attended for a in hooks.record().attention] == sets
    # eager attention takes its softmax in float32 (transformers' eager_attention_forward), so float32 tolerance
    assert torch.allclose(sdpa, eager, atol=1e-6, rtol=0)
    assert model.model.language_model.layers[0].self_attn.config._attn_implementation == "sdpa"  # restored


def test_cli_prints_what_zipvl_did():
    out = subprocess.run([sys.executable, "-m", "sparsevlm", "run", "--image",
                          str(ROOT / "assets/examples/01-colour.png"), "--question", "Which colour is the small cross?",
                          "--method", "zipvl", "--tau", "0.96", "--probes", "both", "--max-new-tokens", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[1].startswith("method: zipvl (no budget: τ = 0.96 sets each layer's count;")
    assert lines[2].startswith("attending per layer (p; visual of 576): 0:")
    assert lines[3].startswith("probe rows against full attention: recall ")
    assert "budget 64" not in out.stdout  # no budget claim for a method that has none


def test_an_option_alias_reaches_its_option():
    """`--mode` (the flag SparseVLM's count mode had before options were declared) sets count_mode; argparse must
    not read it as an abbreviation of --model."""
    from sparsevlm.cli import build_parser, chosen_options

    a = build_parser().parse_args(["run", "--image", "x.png", "--question", "q", "--mode", "paper"])
    assert chosen_options(a) == {"count_mode": "paper"} and a.model is None

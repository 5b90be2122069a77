"""Re-placing a grown decoder's trained layers (training/regrow.py, parts.reader_positions / move_trained_layers)."""

from __future__ import annotations

import pytest
import torch

from training.attention_profile import profile_layers
from training.parts import grown_positions, move_trained_layers, reader_positions


def test_every_layer_a_method_reads_is_a_trained_layer():
    assert grown_positions(8, 32) == [0, 2, 6, 15, 18, 22, 27, 31]  # how the installed model was grown
    assert 1 not in grown_positions(8, 32)  # FastV's K-1 was a grown layer
    assert reader_positions(8, 32) == [0, 1, 2, 6, 8, 15, 16, 31]
    for depth in (16, 32, 40):
        assert set(profile_layers(depth)) <= set(reader_positions(8, depth))
    with pytest.raises(ValueError):
        reader_positions(4, 32)


@pytest.mark.parametrize("prefix", ["model.language_model.layers.", "language_model.model.layers."])
def test_moving_keeps_each_layers_weights_and_both_orders(prefix):
    depth = 32
    state = {f"{prefix}{i}.self_attn.q_proj.weight": torch.full((2, 2), float(i)) for i in range(depth)}
    state["lm_head.weight"] = torch.ones(3)
    old, new = grown_positions(8, depth), reader_positions(8, depth)
    out = move_trained_layers(state, old, new, depth)
    value = [int(out[f"{prefix}{i}.self_attn.q_proj.weight"][0, 0]) for i in range(depth)]
    assert [value[i] for i in new] == old  # the trained layers, in their order, at the new indices
    assert [value[i] for i in range(depth) if i not in new] == [i for i in range(depth) if i not in old]
    assert sorted(value) == list(range(depth)) and torch.equal(out["lm_head.weight"], state["lm_head.weight"])
    with pytest.raises(ValueError):
        move_trained_layers({"lm_head.weight": torch.ones(1)}, old, new, depth)


def test_grown_lr_scale_sets_the_rate_of_the_grown_layers_alone(tmp_path):
    """`train_llava --grown-lr-scale 0`: the layers block expansion added (not at grown_positions) stay as they
    were, the trained ones learn; `--whole-p` draws whole-picture turns into the batch."""
    from training.model import ModelSize, build_model, v2_tokenizer
    from training.train_llava import parser, train

    size = ModelSize(vision_hidden=32, vision_layers=2, vision_heads=2, hidden=32, layers=8, heads=2, kv_heads=1,
                     intermediate=64)
    before = build_model(size, v2_tokenizer(), seed=3).state_dict()
    start = tmp_path / "start.pt"
    torch.save({"model": before, "size": size.to_dict(), "step": 0, "train_seconds": 0.0, "args": {},
                "phase": "instruct"}, start)
    out = tmp_path / "run"
    train(parser().parse_args(["--phase", "instruct", "--out", str(out), "--init-from", str(start), "--until", "1",
                               "--batch", "1", "--turns", "4", "--whole-p", "0.5", "--lr", "1e-3", "--warmup", "1",
                               "--grid-weight", "0", "--grown-lr-scale", "0", "--grown-from", "4", "--seed", "5"]))
    after = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
    trained = grown_positions(4, 8)
    for i in range(8):
        keys = [k for k in before if f"language_model.layers.{i}." in k]
        assert keys
        changed = any(not torch.equal(before[k], after[k]) for k in keys)
        assert changed == (i in trained), i

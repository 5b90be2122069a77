"""Re-place a grown decoder's trained layers on every layer a fixed-layer method reads.

    python -m training.regrow SRC_DIR DEST_DIR     # SRC_DIR/checkpoint.pt -> DEST_DIR/checkpoint.pt (no optimizer)

The installed model was grown from 8 trained decoder layers to 32 by block expansion with the trained layers at
`parts.grown_positions` (0, 2, 6, 15, 18, 22, 27, 31): SparseVLM's pruning layers, but not FastV's K-1 = 1 nor
PyramidDrop's ranking layers 8 and 16, which are grown layers whose residual outputs are about a tenth of a trained
layer's (their attention nearly flat). This moves the trained layers, in their order, to `parts.reader_positions`
(0, 1, 2, 6, 8, 15, 16, 31) and the grown layers, in theirs, to the other indices (`parts.move_trained_layers`):
no weight changes, only which index holds it. The result is a checkpoint a new phase starts from (`train_llava
--init-from DEST_DIR/checkpoint.pt`) or that exports as it is (`train_llava --out DEST_DIR --export ...`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .parts import grown_positions, move_trained_layers, reader_positions


def regrow(src: Path, dest: Path, trained: int = 8) -> dict:
    st = torch.load(src / "checkpoint.pt", map_location="cpu", weights_only=False)
    depth = st["size"]["layers"]
    old, new = grown_positions(trained, depth), reader_positions(trained, depth)
    out = {k: st[k] for k in ("step", "train_seconds", "prior_seconds", "size", "phase", "args") if k in st}
    out["model"] = move_trained_layers(st["model"], old, new, depth)
    out["regrow"] = {"from": str(src), "trained_at": old, "moved_to": new}
    dest.mkdir(parents=True, exist_ok=True)
    torch.save(out, dest / "checkpoint.pt")
    print(f"trained layers {old} -> {new}: {dest / 'checkpoint.pt'}")
    return out["regrow"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.regrow", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="a train_llava --out folder (its checkpoint.pt)")
    p.add_argument("dest", help="where the moved checkpoint.pt goes")
    p.add_argument("--trained", type=int, default=8, help="decoder layers before block expansion")
    a = p.parse_args(argv)
    regrow(Path(a.src), Path(a.dest), a.trained)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The benchmark's curves as a PNG drawn with PIL (no browser or kaleido needed): one panel per accounting, a
colour per method."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

from .figure import METHOD_COLOURS, curves


def png(result: dict, path: Path) -> None:
    """Draw the curves of `result` into the PNG file `path`."""
    by_setting = curves(result)
    accountings = sorted({a for _, a in by_setting if a}, key=lambda a: ("paper", "flops").index(a)
                         if a in ("paper", "flops") else 9)
    panel_w, h, m, legend_w = 420, 520, 55, 150
    w = panel_w * max(1, len(accountings)) + legend_w
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    xs = [math.log(max(r["equal_tokens"], 1)) for rows in by_setting.values() for r in rows]
    x0, x1 = min(xs) - 0.1, max(xs) + 0.1
    budgets = result.get("budgets")  # absent: LLaVA-1.5's, on its 576-token grid
    ticks = (64, 96, 128, 192, 576) if not budgets else (*sorted(budgets), 4 * max(budgets))
    fy = lambda a: h - m - a * (h - 2 * m)  # noqa: E731
    d.text((m, 12), "Accuracy vs equal visual tokens (measured); x: input-counted equal tokens, log scale",
           fill="black")
    for k, accounting in enumerate(accountings):
        left, right = k * panel_w + m, (k + 1) * panel_w - 10
        fx = lambda t, left=left, right=right: left + (math.log(max(t, 1)) - x0) / (x1 - x0) * (right - left)  # noqa: E731
        d.rectangle([left, m, right, h - m], outline="black")
        d.text((left + 5, m - 18), f"{accounting} accounting", fill="black")
        for a in (0, 0.25, 0.5, 0.75, 1.0):
            d.text((left - 38, fy(a) - 6), f"{int(a * 100)}%", fill="black")
            d.line([(left, fy(a)), (right, fy(a))], fill="#e5e7eb")
        for t in ticks:
            if x0 <= math.log(t) <= x1:
                d.text((fx(t) - 8, h - m + 8), str(t), fill="black")
        for (method, acc), rows in by_setting.items():
            if acc not in (accounting, ""):
                continue
            c = METHOD_COLOURS.get(method, "purple")
            pts = [(fx(r["equal_tokens"]), fy(r["accuracy"])) for r in rows]
            if len(pts) > 1:
                d.line(pts, fill=c, width=2)
            for p in pts:
                d.ellipse([p[0] - 4, p[1] - 4, p[0] + 4, p[1] + 4], fill=c)
    for k, method in enumerate(dict.fromkeys(mth for mth, _ in by_setting)):
        d.text((w - legend_w + 10, m + 10 + 18 * k), f"- {method}", fill=METHOD_COLOURS.get(method, "purple"))
    img.save(path)

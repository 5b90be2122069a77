"""The benchmark's curves (accuracy against equal tokens, one per method and accounting) and the interactive plotly
figure of them; `png` draws the same curves without a browser."""

from __future__ import annotations

# One colour per method, the same in both figures (matplotlib's tab10).
METHOD_COLOURS = {"dense": "#000000", "sparsevlm": "#d62728", "sparsevlm-v2": "#ff7f0e", "fastv": "#1f77b4",
                  "fastervlm": "#2ca02c", "visionzip": "#17becf", "divprune": "#9467bd", "pyramiddrop": "#8c564b",
                  "dart": "#e377c2", "random": "#7f7f7f"}


def curves(result: dict) -> dict[tuple[str, str], list[dict]]:
    """(method, accounting) -> its fixed-budget rows by equal tokens; dense under ("dense", ""). The adaptive
    SparseVLM settings (paper eq. 8, reference code) are single points, not part of a budget curve."""
    out: dict[tuple[str, str], list[dict]] = {}
    for r in result["rows"]:
        if "accuracy" not in r:
            continue
        if r["method"] == "dense":
            out.setdefault(("dense", ""), []).append(r)
        elif r["setting"] == f"{r['method']}-{r['budget']}-{r['accounting']}":
            out.setdefault((r["method"], r["accounting"]), []).append(r)
    return {k: sorted(v, key=lambda r: r["equal_tokens"]) for k, v in out.items()}


def figure(result: dict):
    """Accuracy vs input-counted equal tokens, one line per method and accounting (FasterVLM paper, Fig. 2)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for (method, accounting), rows in curves(result).items():
        name = method if method == "dense" else f"{method} ({accounting})"
        fig.add_trace(go.Scatter(x=[r["equal_tokens"] for r in rows], y=[100 * r["accuracy"] for r in rows],
                                 text=[r["setting"] for r in rows], name=name,
                                 mode="lines+markers" if method != "dense" else "markers",
                                 line={"color": METHOD_COLOURS.get(method), "dash": "dot" if accounting == "paper"
                                       else "solid"}))
    fig.update_layout(title="Accuracy vs equal visual tokens (measured); solid: flops accounting, dotted: paper",
                      xaxis_title="equal tokens, input-counted (mean visual tokens each decoder layer processes)",
                      yaxis_title="exact-match accuracy (%)", xaxis_type="log", template="plotly_white",
                      width=900, height=540)
    return fig

"""Pure functions from a PruneTrace (and the user's image) to pictures, figures and tables.

Nothing here touches the model or Gradio: every function reads the recorded trace, so each is testable on a
hand-built trace and the CLI or a notebook can reuse them. Importing a renderer loads neither torch nor the
engine's request path (tests/test_render_imports.py). One module a concern:

- `overlays`: pictures over the upload (what a layer sees, the score heatmap, a token's attention, the compare
  gallery) and their legend;
- `export`: the run as an animated GIF or an MP4, one captioned picture per decoder layer;
- `figures`: plotly figures (raters, tokens per layer, ZipVL's mass curve and counts, latency and cost);
- `tables`: HTML and Markdown tables (count rules, a patch's fate, probe rows, latency, the compare table);
- `captions`: the sentences around them (layer captions, answers, budgets, notices);
- `truth`: a generated scene's ground truth and the evidence recall of a run;
- `layers`: what each decoder layer sees, read from the trace (patch states, counts, scores);
- `geometry`: where a patch lies on the upload;
- `words`: method labels, options, tokens, units and HTML escaping.

The names below are the package's own: `from app import render; render.counts_figure(trace)`.
"""

from sparsevlm.evaluation.recall import evidence_recall, evidence_recall_per_stage

from .captions import (
    answer_markdown,
    answers_agree,
    attention_caption,
    budget_line,
    empty_answer_note,
    layer_caption,
    rater_highlights,
    token_attention_note,
    unknown_words_html,
)
from .export import animation_frames, caption_strip, pruning_animation, pruning_video
from .figures import (
    COUNT_COLOURS,
    LABEL_HEADROOM,
    count_comparison_figure,
    counts_figure,
    latency_figure,
    mass_curve_figure,
    raters_figure,
)
from .geometry import (
    DISPLAY_SIDE,
    canvas_size,
    display_size,
    n_tokens,
    patch_at,
    patch_box,
    patch_index_map,
    token_place,
    views_of,
)
from .layers import (
    KEPT,
    PRUNED,
    SKIPPED,
    attendance_share,
    attended_patches,
    attention_at,
    count_kind,
    default_layer,
    final_layer,
    heatmap_stage,
    layer_counts,
    num_layers,
    patch_fate,
    patch_scores,
    patch_states,
    token_attention,
)
from .overlays import (
    CLUSTER_COLOURS,
    CLUSTER_TINT,
    COMPARE_SIDE,
    EVIDENCE_RGB,
    OUTSIDE_DIM,
    PRUNED_DIM,
    SKIPPED_TINT,
    Canvas,
    canvas,
    colormap,
    compare_pictures,
    draw_outline,
    legend_html,
    render_heatmap,
    render_layer,
    render_layers,
    render_view,
    token_attention_views,
)
from .tables import (
    COMPARE_HEADERS,
    COMPARE_LEGEND,
    COMPARE_SHORT,
    LATENCY_HEADERS,
    PATCH_HEADERS,
    attention_formulas_markdown,
    compare_rows,
    compare_table_html,
    formulas_markdown,
    latency_rows,
    latency_table_html,
    patch_fate_html,
    probe_strip_svg,
    probes_html,
    table_html,
)
from .truth import recall_text, regrid_patches, truth_html
from .words import RANKS_BY, config_option, format_bytes, method_label

__all__ = [
    "CLUSTER_COLOURS", "CLUSTER_TINT", "COMPARE_HEADERS", "COMPARE_LEGEND", "COMPARE_SHORT", "COMPARE_SIDE",
    "COUNT_COLOURS", "Canvas", "DISPLAY_SIDE", "EVIDENCE_RGB", "KEPT", "LABEL_HEADROOM", "LATENCY_HEADERS",
    "OUTSIDE_DIM", "PATCH_HEADERS", "PRUNED", "PRUNED_DIM", "RANKS_BY", "SKIPPED", "SKIPPED_TINT", "animation_frames",
    "answer_markdown", "answers_agree", "attendance_share", "attended_patches", "attention_at", "attention_caption",
    "attention_formulas_markdown", "budget_line", "canvas", "caption_strip", "colormap", "compare_pictures",
    "compare_rows", "compare_table_html", "config_option", "count_comparison_figure", "count_kind", "counts_figure",
    "canvas_size", "default_layer", "display_size", "n_tokens", "token_place", "views_of", "draw_outline",
    "empty_answer_note", "evidence_recall",
    "evidence_recall_per_stage", "final_layer", "format_bytes", "formulas_markdown", "heatmap_stage",
    "latency_figure", "latency_rows", "latency_table_html", "layer_caption", "layer_counts", "legend_html",
    "mass_curve_figure", "method_label", "num_layers", "patch_at", "patch_box", "patch_fate", "patch_fate_html",
    "patch_index_map", "patch_scores", "patch_states", "probe_strip_svg", "probes_html", "pruning_animation",
    "pruning_video", "rater_highlights", "raters_figure", "recall_text", "regrid_patches", "render_heatmap",
    "render_layer", "render_layers", "render_view", "table_html", "token_attention", "token_attention_note",
    "token_attention_views", "truth_html", "unknown_words_html",
]

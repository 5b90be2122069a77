"""What the loaded model knows, and how its decoder's attention compares with LLaVA-1.5's: pure renderers over
plain data (a model's world, its measured attention profile summary), no model and no torch.

- `knows_html`: beside the model's name. A model trained on generated scenes (the embedded ones) answers those
  only; a photo gets words that mean nothing. It says so and points to the presets that read photos.
- `upload_notice_html`: beside an answer to a picture the page did not draw (an upload, not an example or a
  studio scene) on such a model.
- `attention_likeness_html`: the compare tab's explanation for the loaded model, from its folder's measured
  likeness summary (`training.likeness`, the attention profile over 240 pictures): what it shares with
  LLaVA-1.5-7B's decoder (FasterVLM's attention shift and dispersion), where the attention goes on blank pictures
  (position alone) when the summary has them, and what that means for each family of methods; for a model that
  has no such measurement, it says so and points to the Attention profile tab.
"""

from __future__ import annotations

import html

PHOTO_PRESETS = ("llava-hf/llava-1.5-7b-hf (GPU)", "bczhou/tiny-llava-v1-hf (CPU)")
SCENE_CONTENT = "shapes, colours, counts, positions and short text on plain backgrounds"
# FasterVLM's LLaVA-1.5-7B figures (profile.PUBLISHED): last token's top-20% share about 0.6, shifted; [CLS] ~0.8
LLAVA_LAST_TOP20 = 0.60
LLAVA_CLS_TOP20 = 0.80
NO_SHIFT = 0.05  # a lower-half share within 0.5 +- this reads as no shift


def knows_html(world: str | None) -> str:
    """One line beside the model's name: what a scenes model can answer; empty for other models."""
    if not world:
        return ""
    return (f"<div class='sv-knows'>This model was trained here on generated scenes (world {html.escape(world)}): "
            f"it answers questions about {SCENE_CONTENT}. A photo gets words that mean nothing. For photos, load "
            f"{' or '.join(html.escape(p) for p in PHOTO_PRESETS)}.</div>")


def upload_notice_html(world: str | None, from_page: bool) -> str:
    """Beside an answer: the picture was uploaded (not an example or a studio scene) to a scenes model."""
    if not world or from_page:
        return ""
    return ("<div class='sv-knows sv-upload'>This picture was uploaded, and this model knows generated scenes only "
            f"({SCENE_CONTENT}). If it is a photo, both answers mean nothing; for photos load "
            f"{' or '.join(html.escape(p) for p in PHOTO_PRESETS)}.</div>")


def _fig(pair) -> float | None:
    try:
        return float(pair[0])
    except (TypeError, ValueError, IndexError):
        return None


def attention_likeness_html(name: str, summary: dict | None) -> str:
    """The compare tab's note for this model (see the module docstring). `summary` is the `attention_profile`
    block of the model's likeness summary ({"all": {"n", "cls", "decoder": [{"layer", "read_by", "last"}]}})."""
    who = html.escape(name)
    block = (summary or {}).get("all") if isinstance(summary, dict) else None
    if not block or not block.get("decoder"):
        return (f"<div class='sv-likeness'><b>How {who}'s attention compares with LLaVA-1.5's</b>: not measured for "
                "this model. The <i>Attention profile</i> tab shows, for the picture of each run, where the decoder's "
                "attention and the [CLS] attention go (FasterVLM's shift and dispersion).</div>")
    blank = summary.get("blank") if isinstance(summary.get("blank"), dict) else None
    blank_lower = {d.get("layer"): _fig(d.get("last", {}).get("lower_half_share"))
                   for d in (blank or {}).get("decoder", [])}
    rows = []
    shifted_any = False
    for d in block["decoder"]:
        last = d.get("last", {})
        lower, top = _fig(last.get("lower_half_share")), _fig(last.get("top20_share"))
        if lower is None or top is None:
            continue
        shifted_any |= lower > 0.5 + NO_SHIFT
        readers = ", ".join(d.get("read_by", []))
        b = blank_lower.get(d["layer"])
        rows.append(f"<tr><td>{d['layer']}</td><td>{html.escape(readers)}</td><td>{lower:.2f}</td><td>{top:.2f}</td>"
                    + (f"<td>{b:.2f}</td>" if blank else "") + "</tr>")
    cls = block.get("cls") or {}
    cls_lower, cls_top = _fig(cls.get("lower_half_share")), _fig(cls.get("top20_share"))
    n = block.get("n", "?")
    table = ("<table class='sv-likeness-table'><tr><th>decoder layer</th><th>read by</th><th>last token: lower-half "
             "share</th><th>top-20% share</th>" + ("<th>lower-half share, blank pictures</th>" if blank else "")
             + "</tr>" + "".join(rows) + "</table>")
    blank_line = ""
    if blank:
        leaning = [(la, v) for la, v in blank_lower.items() if v is not None and v > 0.5 + NO_SHIFT]
        where = ", ".join(f"layer {la} ({v:.2f})" for la, v in leaning)
        blank_line = (f" On {blank.get('n', '?')} blank pictures (a plain background with nothing on it, so only "
                      "position can steer the attention) its last token's attention leans to the lower half at "
                      f"{where}: a lean toward later tokens like the shift FasterVLM describes is there, hidden by the "
                      "content wherever there is something to see." if leaning else
                      f" On {blank.get('n', '?')} blank pictures (a plain background with nothing on it) there is no "
                      "lean either: no layer's lower-half share is outside 0.5 ± 0.05.")
    shift = ("shows an attention shift at some layer" if shifted_any else
             "shows <b>no attention shift</b>: its last token's attention lies as much on the upper half of the "
             "picture as on the lower (lower-half shares near 0.5), where LLaVA-1.5-7B's leans to the lower half")
    cls_line = ""
    if cls_lower is not None and cls_top is not None:
        cls_line = (f" Its vision tower's [CLS] holds {cls_top:.2f} of its attention on the top 20% of the patches "
                    f"(LLaVA-1.5-7B's CLIP: about {LLAVA_CLS_TOP20:.1f}) and {cls_lower:.2f} on the lower half"
                    + (", a lean toward the lower half that LLaVA-1.5's CLIP does not have."
                       if cls_lower > 0.5 + NO_SHIFT else "."))
    families = (
        "<ul><li><b>Methods that rank by the decoder's attention</b> (FastV, SparseVLM, PyramidDrop): on "
        "LLaVA-1.5-7B the shift makes them keep mostly lower-half tokens and the dispersion spreads their scores "
        f"(top 20% ≈ {LLAVA_LAST_TOP20:.1f}), which is why they trail at high reduction in the papers. "
        + ("Here, without the shift and where a layer concentrates on the objects, they see better attention than on "
           "LLaVA-1.5, and can rank better here than the papers find." if not shifted_any else
           "Here the shift is present at some layer: compare the table.")
        + "</li><li><b>Methods that rank by [CLS] attention</b> (FasterVLM, VisionZip): they read the tower, not the "
          "decoder; how well they do follows this model's [CLS], trained here the way CLIP is.</li>"
          "<li><b>Methods that read neither</b> (DivPrune, DART's duplication, random) are untouched by both."
          "</li></ul>")
    return (f"<div class='sv-likeness'><b>How {who}'s decoder attends, beside LLaVA-1.5-7B's</b> (measured on {n} "
            f"pictures, its folder's likeness summary): it {shift}.{blank_line}{cls_line}{table}{families}</div>")

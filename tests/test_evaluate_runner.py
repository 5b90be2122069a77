"""The benchmark (`python -m sparsevlm eval`) asks its questions through the pipeline, as the CLI and the app do:
one request per question, the image encoded once for every setting, the pipeline's checks applied, and each
setting's answer and figures those of `pipeline.run` alone, on LLaVA-1.5 and LLaVA-NeXT alike."""

import pytest

from sparsevlm.config import PruneConfig
from sparsevlm.errors import ConfigError, InputError
from sparsevlm.evaluation.runner import MAX_NEW_TOKENS, evaluate, settings
from sparsevlm.loading import from_objects
from sparsevlm.methods import register, unregister
from sparsevlm.methods.random_subset import RandomSubset
from sparsevlm.pipeline import run
from sparsevlm.scenes.worlds import DEFAULT_WORLD, heldout_item
from sparsevlm.testing import tiny_llava, tiny_llava_next

N = 3
# At most 88 visual tokens on either model, so the 192-token setting cannot run
LABELS = ["dense", "sparsevlm-64-paper", "fastv-64-flops", "visionzip-64-paper", "zipvl-tau0.975",
          "sparsevlm-192-paper"]


@pytest.fixture(scope="module")
def lm():
    model, processor = tiny_llava(image_size=112, layers=4)  # an 8x8 grid: 64 visual tokens
    return from_objects(model, processor, "tiny")


@pytest.fixture(scope="module", params=["llava", "llava-next"])
def either(request, lm):
    if request.param == "llava":
        return lm
    model, processor = tiny_llava_next(layers=4)  # a base view and anyres tiles of 4x4 patches each
    return from_objects(model, processor, "tiny-next")


def test_each_question_is_one_request_whose_runs_match_run_alone(either, monkeypatch):
    lm = either
    calls, answers = [], []
    decode = lm.processor.decode
    monkeypatch.setattr(lm.processor, "decode", lambda *a, **k: answers.append(decode(*a, **k).strip()) or answers[-1])
    handle = lm.model.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    try:
        result = evaluate(lm, N, seed=0, labels=LABELS, log=None, world=DEFAULT_WORLD)
    finally:
        handle.remove()
    assert len(calls) == N  # the vision tower ran once per question, not once per setting
    asked = [s.label for s in settings() if s.label in LABELS[:-1]]  # the benchmark's order
    answered = {(i, label): answers[i * len(asked) + j] for i in range(N) for j, label in enumerate(asked)}
    assert len(answers) == N * len(asked)
    rows = {r["setting"]: r for r in result["rows"]}
    assert set(rows["sparsevlm-192-paper"]) == {"setting", "unavailable"}
    assert rows["sparsevlm-192-paper"]["unavailable"].startswith("budget 192 is larger than the image grid")
    by_label = {s.label: s.config for s in settings()}
    for label in LABELS[:-1]:
        alone = []
        for i in range(N):
            sample = heldout_item(i, 0, DEFAULT_WORLD)
            trace = run(lm, sample.image, sample.sample.question, by_label[label], max_new_tokens=MAX_NEW_TOKENS).trace
            assert trace.answer == answered[i, label]
            alone.append((int(trace.answer.lower() == sample.sample.answer.lower()), trace.cost.equal_tokens,
                          trace.cost.prefill_flops / trace.cost.prefill_flops_dense))
        row = rows[label]
        assert row["hits"] == [a[0] for a in alone] and row["questions"] == N
        assert row["equal_tokens"] == pytest.approx(sum(a[1] for a in alone) / N)
        assert row["flops_ratio"] == pytest.approx(sum(a[2] for a in alone) / N)


def test_a_prompt_beyond_the_context_is_refused_as_run_refuses_it():
    model, processor = tiny_llava(image_size=112, layers=2, context=70)  # 64 visual tokens + the question > 70
    small = from_objects(model, processor, "tiny-context")
    with pytest.raises(InputError, match="would not fit the model's context of 70"):
        evaluate(small, 1, seed=0, labels=["dense"], log=None, world=DEFAULT_WORLD)
    sample = heldout_item(0, 0, DEFAULT_WORLD)
    with pytest.raises(InputError, match="would not fit the model's context of 70"):
        run(small, sample.image, sample.sample.question, PruneConfig(method="dense"), max_new_tokens=MAX_NEW_TOKENS)


def test_a_label_that_names_no_setting_is_refused_before_any_question(lm):
    calls = []
    handle = lm.model.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ConfigError, match="no benchmark setting is named sparsevlm, fastv: a setting is dense"):
            evaluate(lm, 1, seed=0, labels=["dense", "sparsevlm", "fastv"], log=None, world=DEFAULT_WORLD)
        with pytest.raises(ConfigError, match="fastv-64-flops is not among the settings of the paper accounting"):
            evaluate(lm, 1, seed=0, labels=["fastv-64-flops"], log=None, accountings=("paper",), world=DEFAULT_WORLD)
    finally:
        handle.remove()
    assert not calls


class _RefusesTheSecondQuestion(RandomSubset):
    """Random selection that refuses its second request: a refusal that depends on the input, as a budget a
    larger picture's layout cannot meet would."""

    name, label = "refuses-second", "Refuses the second question"

    def __init__(self):
        self.calls = 0

    def prepare(self, cfg, inp):
        self.calls += 1
        if self.calls == 2:
            raise ConfigError("not on this input")
        return None


def test_a_refusal_after_the_first_question_stops_the_benchmark_naming_setting_and_question(lm):
    register(_RefusesTheSecondQuestion())
    try:
        with pytest.raises(ConfigError, match=r"^refuses-second-64-paper answered 1 question and was refused at "
                                              r"question 2 of 3: not on this input$"):
            evaluate(lm, 3, seed=0, labels=["dense", "refuses-second-64-paper"], log=None, world=DEFAULT_WORLD)
    finally:
        unregister("refuses-second")

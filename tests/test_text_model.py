"""The text model: the generator's messages (signal the numbers lack, nothing else changed), the point-in-time
training column, serving (parity with training, batching, the encoder check), its reason code, and its lift."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from riskcascade.core.config import Settings, TrainingSettings
from riskcascade.core.domain import ScoreRequest
from riskcascade.modelling import synthetic
from riskcascade.modelling.datasets.synthetic_source import synthetic_dataset
from riskcascade.modelling.synthetic import event_text, generate_events, split_events
from riskcascade.modelling.synthetic_marketplace import ACCOUNT_CHANGE
from riskcascade.modelling.synthetic_messages import LEGIT_SCRIPTED_SHARE, SCRIPTS, SLOTS
from riskcascade.modelling.text_model import (
    TEXT_FEATURE,
    TEXT_MODEL_FILE,
    TextHead,
    field_texts,
    fit_text_model,
    shared_encoder,
)
from riskcascade.modelling.training import _fit_text, write_model
from riskcascade.text_lift import compare, format_text_lift
from services.scorer.fast_model import FastModel

EMBEDDING = Path("var/embedding").resolve()
N_EVENTS, SEED = 6000, 7
LIFT_EVENTS = 10_000  # on 6,000 events the column costs test average precision (0.929 to 0.917): too little data
ALWAYS = TrainingSettings(text_model={"keep": "always"})


def _script_pattern() -> re.Pattern[str]:
    """Matches exactly the lines the scripts can render (any slot filling)."""
    lines = sorted({line for by_type in SCRIPTS.values() for pool in by_type.values() for line in pool})
    slot = re.compile(r"\{(?:" + "|".join(SLOTS) + r")\}")

    def pattern(line: str) -> str:
        parts = slot.split(line)  # the literal text between slots
        return ".+?".join(re.escape(p) for p in parts)

    return re.compile("|".join(f"(?:{pattern(line)})" for line in lines))


SCRIPTED = _script_pattern()


@pytest.fixture(scope="module")
def parts():
    return split_events(generate_events(N_EVENTS, SEED), SEED)


@pytest.fixture(scope="module")
def lift():
    """Both models (without and with text) on one split of a small data set, through the report's own code."""
    settings = Settings(data={"n_events": LIFT_EVENTS, "seed": SEED})
    dataset = synthetic_dataset(split_events(generate_events(LIFT_EVENTS, SEED), SEED))
    return dataset, compare(settings, dataset, bootstrap_rounds=50)


@pytest.fixture(scope="module")
def served(parts, tmp_path_factory):
    """A text model written to disk as training writes it, and the training's own text column for comparison."""
    dataset = synthetic_dataset(parts)
    from riskcascade.modelling.training import fit_fast_model

    model = fit_fast_model(dataset, dataset.splits[0], ALWAYS, SEED, embedding_dir=EMBEDDING)
    folder = tmp_path_factory.mktemp("text-model")
    write_model(model, folder, {})
    column = _fit_text(dataset, dataset.splits[0], ALWAYS, SEED, EMBEDDING).feature
    return folder, dataset, column


def request_of(e, text=None) -> ScoreRequest:
    return ScoreRequest.of(e.case_id, e.event_type, e.entities, dict(e.features), occurred_at=e.occurred_at,
                           text=event_text(e) if text is None else text)


# --- The generator ---------------------------------------------------------------------------------------------


def test_messages_change_no_other_column(monkeypatch):
    """Messages come from their own random stream: with them blanked, every feature, note, time and label is the
    same (a message drawn from the simulation's stream would shift every later draw)."""
    with_messages = generate_events(2000, 3)
    monkeypatch.setattr(synthetic, "write_messages", lambda seed, event_type, *_: [""] * len(event_type))
    without = generate_events(2000, 3)
    assert [replace(e, message="") for e in with_messages] == without
    assert sum(bool(e.message) for e in with_messages) > 1000


def test_sophisticated_fraud_pastes_scripts_its_legitimate_twins_do_not():
    """The signal the numbers lack: sophisticated clusters and their twins are alike in features, but the fraud
    pastes its cluster's script and the twin writes like everyone else."""
    sim = synthetic._simulate(20000, 5)
    fraud = np.array([bool(r) for r in sim.risk_type])
    scripted = np.array([bool(SCRIPTED.fullmatch(m)) for m in sim.messages])
    has_text = np.array([bool(m) for m in sim.messages])
    sophisticated_fraud = sim.sophisticated & fraud & has_text
    twins = sim.sophisticated & ~fraud & has_text
    assert sophisticated_fraud.sum() > 300 and twins.sum() > 300
    assert scripted[sophisticated_fraud].mean() > 0.5
    assert scripted[twins].mean() < 3 * LEGIT_SCRIPTED_SHARE
    # copy-paste: a cluster's pasted line is the same for its members
    pasted = sophisticated_fraud & scripted
    per_cluster = {}
    for i in np.flatnonzero(pasted):
        per_cluster.setdefault((sim.cluster[i], sim.event_type[i]), set()).add(sim.messages[i])
    assert all(len(lines) == 1 for lines in per_cluster.values())


def test_csv_round_trips_messages_and_reads_files_written_before_them(tmp_path):
    events = generate_events(400, 2)
    path = synthetic.write_events_csv(tmp_path / "e.csv", events)
    assert synthetic.read_events_csv(path) == events
    lines = path.read_text().splitlines()
    column = lines[0].split(",").index("message")
    import csv

    rows = list(csv.reader(lines))
    old = tmp_path / "old.csv"
    with old.open("w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([r[:column] + r[column + 1:] for r in rows])
    assert synthetic.read_events_csv(old) == [replace(e, message="") for e in events]


# --- Training: point in time -----------------------------------------------------------------------------------


def _blocks(dataset, blocks: int):
    split, times = dataset.splits[0], dataset.times
    train = np.flatnonzero(split == "train")
    ordered = train[np.argsort(times[train], kind="stable")]
    return [b for b in np.array_split(ordered, blocks)] + [np.flatnonzero(split == "valid")]


def _text_fit(dataset, labels, cut):
    texts = [field_texts({"note": n, "message": m}, ("note", "message"))
             for n, m in zip(dataset.extra["note"], dataset.extra["message"])]
    return fit_text_model(texts, labels, dataset.splits[0], dataset.times, dataset.label_times, cut,
                          ("note", "message"), shared_encoder(EMBEDDING), "m@x",
                          time_blocks=4, regularization=1.0, min_class_labels=20, seed=SEED)


def test_each_block_is_scored_without_labels_that_arrived_after_it_started(parts):
    """Flipping every label that arrives after a block starts leaves that block's scores exactly as they were; the
    same for the saved head (test rows) and labels after the cut. The first block has no score."""
    dataset = synthetic_dataset(parts)
    cut = float(dataset.times[dataset.splits[0] == "test"].min())
    base = _text_fit(dataset, dataset.labels, cut)
    blocks = _blocks(dataset, 4)
    assert np.isnan(base.feature[blocks[0]]).all()
    test = dataset.splits[0] == "test"
    checked = 0
    for start, rows in [(float(dataset.times[b].min()), b) for b in blocks[1:]] + [(cut, np.flatnonzero(test))]:
        if np.isnan(base.feature[rows]).all():  # too few labels of a class had arrived (legitimate ones take 7+ days)
            continue
        late = (dataset.label_times > start) & (dataset.labels >= 0)
        assert late.any()
        flipped = dataset.labels.copy()
        flipped[late] = 1 - flipped[late]
        again = _text_fit(dataset, flipped, cut)
        np.testing.assert_array_equal(again.feature[rows], base.feature[rows])
        checked += 1
    assert checked >= 3  # two train blocks or the valid block, and the test rows
    # ... and the labels do matter: flipping the ones known before the cut changes the test rows' scores
    known = (dataset.label_times <= cut) & (dataset.labels >= 0) & (dataset.splits[0] == "train")
    flipped = dataset.labels.copy()
    flipped[known] = 1 - flipped[known]
    assert not np.allclose(_text_fit(dataset, flipped, cut).feature[test], base.feature[test])


def test_events_without_text_get_no_score(parts):
    dataset = synthetic_dataset(parts)
    dataset.extra.loc[dataset.extra.index[::7], ["note", "message"]] = ""
    fit = _text_fit(dataset, dataset.labels, None)
    blank = np.arange(len(dataset)) % 7 == 0
    assert np.isnan(fit.feature[blank]).all()
    assert not np.isnan(fit.feature[~blank & (dataset.splits[0] == "test")]).any()


# --- Serving ---------------------------------------------------------------------------------------------------


def test_served_text_risk_is_the_training_column_on_the_test_period(parts, served):
    folder, dataset, column = served
    model = FastModel(folder, prefer_gpu=False, embedding_dir=EMBEDDING)
    assert model.reads_text and (folder / TEXT_MODEL_FILE).exists()
    j = model.card.model_features.index(TEXT_FEATURE)
    test = parts["test"][:300]
    x = model.matrix([request_of(e) for e in test])
    np.testing.assert_allclose(x[:, j], column[dataset.splits[0] == "test"][:300].astype(np.float32), rtol=0,
                               atol=1e-6)


def test_a_score_does_not_depend_on_its_batch_or_the_cache(parts, served):
    folder, _, _ = served
    test = parts["test"][300:364]
    texts = [event_text(e) for e in test]
    first = FastModel(folder, prefer_gpu=False, embedding_dir=EMBEDDING)._text.score(texts)  # noqa: SLF001
    again = FastModel(folder, prefer_gpu=False, embedding_dir=EMBEDDING, text_cache_entries=1)
    one_by_one = np.concatenate([again._text.score([t]) for t in texts])  # noqa: SLF001
    np.testing.assert_allclose(one_by_one, first, rtol=0, atol=1e-6)
    assert not np.isnan(first).any()


def test_the_text_changes_the_score_and_missing_text_is_allowed(parts, served):
    folder, _, _ = served
    model = FastModel(folder, prefer_gpu=False, embedding_dir=EMBEDDING)
    e = next(e for e in parts["test"] if e.event_type.value == "account_change")
    script = SCRIPTS[ACCOUNT_CHANGE]["account_takeover"][0]
    plain, scam, blank = (model.matrix([request_of(e, text)])[0, model.card.model_features.index(TEXT_FEATURE)]
                          for text in ({"message": "Moved house, updating my address."}, {"message": script}, {}))
    assert scam > 3 * plain
    assert np.isnan(blank)


def test_a_text_model_needs_the_events_text_and_its_own_encoder(served, tmp_path):
    folder, _, _ = served
    model = FastModel(folder, prefer_gpu=False, embedding_dir=EMBEDDING)
    with pytest.raises(ValueError, match="free text"):
        model.model_input(np.zeros((1, len(model._layout.names))))  # noqa: SLF001
    original = TextHead.load(folder)
    replace(original, encoder="sentence-transformers/all-MiniLM-L6-v2@" + "0" * 16).save(folder)
    try:
        with pytest.raises(ValueError, match="retrain, or export that encoder"):
            FastModel(folder, prefer_gpu=False, embedding_dir=EMBEDDING)
    finally:
        original.save(folder)


def test_the_text_model_is_a_reason_code(parts, served):
    folder, _, _ = served
    model = FastModel(folder, prefer_gpu=False, embedding_dir=EMBEDDING, reasons_for="all")
    scores = model.score_batch([request_of(e) for e in parts["test"][:600]])
    raised = [(e, s) for e, s in zip(parts["test"], scores)
              if any(r.code == f"RISK_UP:{TEXT_FEATURE}" for r in s.reasons)]
    assert raised
    assert all(SCRIPTED.fullmatch(e.message) or e.note for e, _ in raised)
    assert sum(bool(SCRIPTED.fullmatch(e.message)) for e, _ in raised) >= len(raised) / 2


# --- Lift ------------------------------------------------------------------------------------------------------


def test_the_text_model_lifts_the_fast_model(lift):
    """On the same split and seed, the fast model with the text feature ranks better on the test period, most on
    the events the model without it leaves in its band."""
    _, report = lift
    without, with_text = report["figures"]["without text"], report["figures"]["with text"]
    assert with_text["average_precision"] > without["average_precision"] + 0.01
    assert report["average_precision_difference_95"][0] > 0
    uncertain = report["uncertain_without_text"]
    assert uncertain["with text"]["average_precision"] > uncertain["without text"]["average_precision"]
    text = format_text_lift({"command": "riskcascade text-lift", **report})
    assert "| Average precision |" in text and "paired bootstrap" in text


def test_a_text_column_that_does_not_help_on_validation_is_dropped(parts):
    """The gate (``training.text_model.keep``): the trees are grown with and without the text column and it ships
    only when validation average precision is higher with it. On the generator's text it is kept; on text whose
    meaning turns over after the train period (a word that marked fraud now marks legitimate events) it is dropped,
    and the model is the one grown without it."""
    from riskcascade.modelling.training import fit_fast_model

    dataset = synthetic_dataset(parts)
    kept = fit_fast_model(dataset, dataset.splits[0], TrainingSettings(), SEED, embedding_dir=EMBEDDING)
    assert kept.training["text_model_gate"]["kept"] and kept.text_head is not None
    assert kept.feature_names[-1] == TEXT_FEATURE

    fraud = dataset.labels == 1
    later = dataset.splits[0] != "train"
    dataset.extra["message"] = np.where(fraud ^ later, "Please send it quickly, thanks.", "Is this the 2024 model?")
    dataset.extra["note"] = ""
    model = fit_fast_model(dataset, dataset.splits[0], TrainingSettings(), SEED, embedding_dir=EMBEDDING)
    gate = model.training["text_model_gate"]
    assert not gate["kept"] and gate["valid_ap_with_text"] <= gate["valid_ap_without_text"]
    assert model.text_head is None and TEXT_FEATURE not in model.feature_names
    assert model.booster.num_feature() == len(model.feature_names)

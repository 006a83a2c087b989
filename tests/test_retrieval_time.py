"""Time-true retrieval on real engines (Qdrant Edge on disk, qdrant-client local mode): a past case's outcome
counts from when it became known (``label_known_at``), never from the decided event's future.

The stored cases are synthetic marketplace events (their labels arrive days after them, as the generator has it;
every ninth never says when), plus planted twins of the decided event: the same features, note and entities, so
each search would put them first, with labels that arrive just before it, just after it, or at an unknown time.
What each search should return is computed by brute force over the cases known by then and compared with the
engines. The agents, the whole workflow and ``ReasoningService.add_case`` (feedback written while serving) are
checked on the same cases.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from retrieval.case_memory import BehaviourEncoder, CaseMemoryReadOnlyError, open_case_memory
from retrieval.case_nodes import case_narrative, time_order_key
from retrieval.embedding import OnnxMiniLMEmbedding
from retrieval.policy_documents import load_policy_documents
from retrieval.policy_library import open_policy_library
from riskcascade.core.config import ReasonerSettings
from riskcascade.core.domain import AdjudicatedCase, Outcome
from riskcascade.modelling.synthetic import FEATURE_NAMES, generate_events, to_adjudicated_case, to_risk_event
from services.reasoning.agents import SimilarCaseAgent, StructuredDataAgent
from services.reasoning.llm.evidence_backend import EvidenceWeightedLLM
from services.reasoning.service import ReasoningService
from tests.test_reasoning_workflow import request_for, review, workflow_with
from tests.test_retrieval import ARTIFACT_DIR, BACKENDS, model_card_for, settings_for

N_EVENTS = 400
SEED = 5
REASONER = ReasonerSettings()
CASE_KINDS = {"similar_case", "narrative_case", "entity_history", "neighbour_case"}


# -- the scene --------------------------------------------------------------------------------------------------


def labelled_case(e) -> AdjudicatedCase:
    case = to_adjudicated_case(e)
    return case if case.label_known_at is not None else replace(case, label_known_at=e.occurred_at)


class Scene:
    """The decided event, its time ``t`` and the stored cases: synthetic ones and the event's planted twins."""

    def __init__(self):
        events = generate_events(N_EVENTS, seed=SEED)
        self.decided = events[int(0.75 * len(events))]  # later cases are stored too: they are not known at t
        self.t = self.decided.occurred_at
        base = [labelled_case(e) for e in events if e is not self.decided]
        base = [replace(c, label_known_at=None) if i % 9 == 0 else c for i, c in enumerate(base)]
        twin = labelled_case(self.decided)
        t = self.t
        entities = self.decided.entities
        self.twins = [
            # known before the event (the last one a second before it)
            replace(twin, case_id="known-0", occurred_at=t - timedelta(days=3),
                    label_known_at=t - timedelta(hours=1)),
            replace(twin, case_id="known-1", occurred_at=t - timedelta(days=3),
                    label_known_at=t - timedelta(seconds=1)),
            # happened before the event, labelled after it: the newest history and the nearest neighbours
            *[
                replace(twin, case_id=f"late-{i}", occurred_at=t - timedelta(minutes=i + 1),
                        label_known_at=t + timedelta(seconds=1) + timedelta(hours=i))
                for i in range(6)
            ],
            # labelled at an unknown time
            *[replace(twin, case_id=f"unknown-{i}", occurred_at=t - timedelta(seconds=30), label_known_at=None)
              for i in range(3)],
            # other accounts on the same device, IP and instrument: graph neighbours, one known, one late
            replace(twin, case_id="known-neighbour", entities=replace(entities, account_id="acct-known-nb"),
                    occurred_at=t - timedelta(days=1), label_known_at=t - timedelta(minutes=1)),
            replace(twin, case_id="late-neighbour", entities=replace(entities, account_id="acct-late-nb"),
                    occurred_at=t - timedelta(seconds=10), label_known_at=t + timedelta(days=2)),
        ]
        self.stored = base + self.twins
        self.by_id = {c.case_id: c for c in self.stored}
        self.narrative = case_narrative(twin)

    def known_by(self, moment: datetime) -> list[AdjudicatedCase]:
        moment = time_order_key(moment)
        return [c for c in self.stored if c.label_known_at is not None and time_order_key(c.label_known_at) <= moment]

    def late_ids(self) -> set[str]:
        return {c.case_id for c in self.stored if c.case_id not in {k.case_id for k in self.known_by(self.t)}}


@pytest.fixture(scope="module")
def scene() -> Scene:
    return Scene()


@pytest.fixture(scope="module")
def encoder(scene) -> BehaviourEncoder:
    return BehaviourEncoder.from_model_card(model_card_for(scene.stored, list(FEATURE_NAMES)))


@pytest.fixture(scope="module")
def embedder() -> OnnxMiniLMEmbedding:
    if not (ARTIFACT_DIR / "manifest.json").is_file():
        pytest.fail(f"no embedding artefact in {ARTIFACT_DIR}: run `make embedding`", pytrace=False)
    return OnnxMiniLMEmbedding(ARTIFACT_DIR)


@pytest.fixture(scope="module", params=BACKENDS)
def knowledge(request, tmp_path_factory, scene, encoder, embedder):
    """Per backend: the scene's cases in a case memory, and the written policies (for the whole workflow)."""
    settings = settings_for(request.param, tmp_path_factory.mktemp(f"time-{request.param}"))
    memory = open_case_memory(settings, encoder, embedder=embedder)
    memory.add_cases(scene.stored, batch_size=128)
    library = open_policy_library(settings, embedder=embedder)
    library.add_documents(load_policy_documents(settings.policy_dir))
    yield settings, memory, library
    library.close()
    memory.close()


# -- brute force ------------------------------------------------------------------------------------------------


def by_behaviour(encoder, pool, features, top_k) -> list[str]:
    vectors = encoder.encode_many([c.features for c in pool])
    query = np.asarray(encoder.encode(features))
    sims = vectors @ query / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(query))
    # equal vectors tie (the last bit of a BLAS product may differ by row), and ties go by case id
    return [pool[i].case_id for i in sorted(range(len(pool)), key=lambda i: (-round(sims[i], 12), pool[i].case_id))][
        :top_k
    ]


def by_narrative(embedder, pool, text, top_k) -> list[str]:
    # each distinct narrative embedded once, as the case memory does: equal narratives then tie exactly
    texts = sorted({case_narrative(c) for c in pool})
    vector = dict(zip(texts, embedder.embed(texts)))
    query = embedder.embed([text])[0]
    sims = [float(vector[case_narrative(c)] @ query) for c in pool]
    return [pool[i].case_id for i in sorted(range(len(pool)), key=lambda i: (-sims[i], pool[i].case_id))][:top_k]


def recent_first(pool, field, value, limit, other_than_account=None) -> list[str]:
    mine = [
        c for c in pool
        if c.entities is not None and getattr(c.entities, field) == value
        and (other_than_account is None or c.entities.account_id != other_than_account)
    ]
    mine.sort(key=lambda c: c.case_id)
    mine.sort(key=lambda c: (c.occurred_at is not None, c.occurred_at or datetime.min.replace(tzinfo=timezone.utc)),
              reverse=True)
    return [c.case_id for c in mine][:limit]


def cases_of(found) -> list[AdjudicatedCase]:
    """The cases of a search's answer (``RetrievedCase``s or cases)."""
    return [getattr(f, "case", f) for f in found]


def ids(found) -> list[str]:
    return [c.case_id for c in cases_of(found)]


def entity_queries(scene):
    """(field, value, other_than_account) of the decided event's history and neighbour lookups."""
    entities = scene.decided.entities
    account = entities.account_id
    return [("account_id", account, None)] + [
        (link, getattr(entities, link), account) for link in REASONER.neighbour_links if getattr(entities, link)
    ]


# -- the case memory --------------------------------------------------------------------------------------------


def test_a_label_that_arrives_after_the_event_is_never_retrieved(knowledge, scene, encoder, embedder):
    _, memory, _ = knowledge
    features, text, t = scene.decided.features, scene.narrative, scene.t
    known, late = scene.known_by(t), scene.late_ids()
    assert {"late-0", "late-5", "late-neighbour", "unknown-0"} <= late and len(known) > 100
    for top_k in (5, 8):
        # unbounded, twins labelled later are among the first (ties by case id: known-0, known-1, known-neighbour,
        # late-0, ...); bounded, the three known twins and then the nearest known synthetic cases
        unbounded = memory.similar_cases(features, top_k)
        assert ids(unbounded) == by_behaviour(encoder, scene.stored, features, top_k) and set(ids(unbounded)) & late
        bounded = memory.similar_cases(features, top_k, known_by=t)
        # filtered in the engine: top_k cases still come back, the nearest of those known by then
        assert ids(bounded) == by_behaviour(encoder, known, features, top_k) and len(bounded) == top_k
        assert ids(bounded)[:3] == ["known-0", "known-1", "known-neighbour"]
        unbounded = memory.similar_narratives(text, top_k)
        assert set(ids(unbounded)) & late
        bounded = memory.similar_narratives(text, top_k, known_by=t)
        assert ids(bounded) == by_narrative(embedder, known, text, top_k) and len(bounded) == top_k
        assert not set(ids(bounded)) & late
    for field, value, other in entity_queries(scene):
        for limit in (2, 5):
            unbounded = memory.cases_with_entity(field, value, limit, other_than_account=other)
            assert ids(unbounded) == recent_first(scene.stored, field, value, limit, other)
            assert set(ids(unbounded)) & late, (field, "the newest cases of the entity are labelled later")
            bounded = memory.cases_with_entity(field, value, limit, other_than_account=other, known_by=t)
            assert ids(bounded) == recent_first(known, field, value, limit, other)
            assert not set(ids(bounded)) & late
    # the account's newest cases before the event are all labelled later or at an unknown time; its known ones
    # still fill the limit
    account = scene.decided.entities.account_id
    before_t = [c for c in memory.cases_with_entity("account_id", account, 40) if c.occurred_at <= t]
    assert ids(before_t[:9]) == [*(f"unknown-{i}" for i in range(3)), *(f"late-{i}" for i in range(6))]
    history = memory.cases_with_entity("account_id", account, 2, known_by=t)
    assert len(history) == 2 and ids(history) == recent_first(known, "account_id", account, 2)
    wide = memory.similar_cases(features, 60, known_by=t) + memory.similar_narratives(text, 60, known_by=t)
    assert all(c.label_known_at is not None and c.label_known_at <= t for c in cases_of(wide))


def test_a_case_counts_once_its_label_has_arrived(knowledge, scene):
    _, memory, _ = knowledge
    features, t = scene.decided.features, scene.t
    arrival = scene.by_id["late-0"].label_known_at  # t + 1 s
    assert "late-0" not in ids(memory.similar_cases(features, 4, known_by=arrival - timedelta(microseconds=1)))
    # the bound is inclusive, and one instant whatever its zone (a naive time is UTC)
    for moment in (arrival, arrival.astimezone(timezone(timedelta(hours=-7))), arrival.replace(tzinfo=None)):
        assert ids(memory.similar_cases(features, 4, known_by=moment)) == [
            "known-0", "known-1", "known-neighbour", "late-0"
        ]
        assert "late-0" in ids(memory.similar_narratives(scene.narrative, 4, known_by=moment))
        history = memory.cases_with_entity("account_id", scene.decided.entities.account_id, 1, known_by=moment)
        assert ids(history) == ["late-0"]  # now the newest case of the account known by then
    later = t + timedelta(days=3)
    assert {f"late-{i}" for i in range(6)} <= set(ids(memory.similar_cases(features, 12, known_by=later)))


def test_cases_without_label_known_at_count_only_without_a_bound(knowledge, scene):
    _, memory, _ = knowledge
    features, account = scene.decided.features, scene.decided.entities.account_id
    unknown = {c.case_id for c in scene.stored if c.label_known_at is None}
    assert len(unknown) > 40  # every ninth synthetic case, and the three unknown twins
    far = scene.t + timedelta(days=3650)  # every known label has arrived by then; unknown ones still do not count
    searches = [
        lambda **kw: memory.similar_cases(features, 14, **kw),
        lambda **kw: memory.similar_narratives(scene.narrative, 14, **kw),
        lambda **kw: memory.cases_with_entity("account_id", account, 4, **kw),
    ]
    for search in searches:
        assert {"unknown-0", "unknown-1", "unknown-2"} <= set(ids(search()))
        assert not set(ids(search(known_by=far))) & unknown
    everything = memory.similar_cases(features, len(scene.stored), known_by=far)
    assert len(everything) == len(scene.stored) - len(unknown)


def test_known_by_combines_with_the_other_filters(knowledge, scene, encoder, embedder):
    _, memory, _ = knowledge
    e, t = scene.decided, scene.t
    exclude = ["known-0", scene.known_by(t)[0].case_id]
    known = [c for c in scene.known_by(t) if c.case_id not in exclude]
    same_type = [c for c in known if c.event_type == e.event_type]
    kwargs = dict(exclude_case_ids=exclude, event_type=e.event_type, known_by=t)
    got = memory.similar_cases(e.features, 6, **kwargs)
    assert ids(got) == by_behaviour(encoder, same_type, e.features, 6) and ids(got)[0] == "known-1"
    got = memory.similar_narratives(scene.narrative, 6, **kwargs)
    assert ids(got) == by_narrative(embedder, same_type, scene.narrative, 6)
    for field, value, other in entity_queries(scene):
        got = memory.cases_with_entity(field, value, 3, exclude_case_ids=exclude, other_than_account=other,
                                       known_by=t)
        assert ids(got) == recent_first(known, field, value, 3, other)


# -- the agents and the workflow --------------------------------------------------------------------------------


def cited_cases(items) -> set[str]:
    """The case ids an evidence list cites (policy passages left out)."""
    return {item.id.split(":", 1)[1] for item in items if item.kind in CASE_KINDS}


def test_the_case_agents_never_cite_a_case_labelled_after_the_event(knowledge, scene):
    _, memory, _ = knowledge
    structured = StructuredDataAgent(memory, limit=20, neighbour_links=REASONER.neighbour_links)
    similar = SimilarCaseAgent(memory, top_k=10, narrative_top_k=5)
    event = to_risk_event(scene.decided)
    found = structured.run(event).items + similar.run(event, scene.narrative).items
    cited = cited_cases(found)
    assert all(scene.by_id[c].label_known_at <= scene.t for c in cited)
    assert not cited & scene.late_ids()
    kinds = {(i.kind, i.id) for i in found}
    assert {("entity_history", "history:known-0"), ("neighbour_case", "neighbour:known-neighbour"),
            ("similar_case", "case:known-0")} <= kinds
    assert sum(i.kind == "similar_case" for i in found) == 10  # filled from the cases known by then
    # A live event without a time is decided now: every label of the scene has arrived, unknown ones still do not
    live = replace(event, occurred_at=None)
    found_live = structured.run(live).items + similar.run(live, scene.narrative).items
    cited_live = cited_cases(found_live)
    assert {"late-0", "late-neighbour"} <= cited_live
    assert not cited_live & {c.case_id for c in scene.stored if c.label_known_at is None}


def test_the_workflow_never_cites_a_case_labelled_after_the_event(knowledge, scene):
    verdict = review(workflow_with(knowledge, EvidenceWeightedLLM(settings=REASONER)), request_for(scene.decided))
    cited = cited_cases(verdict.evidence)
    assert "known-0" in cited and not cited & scene.late_ids()
    assert all(scene.by_id[c].label_known_at <= scene.t for c in cited)


# -- feedback while serving -------------------------------------------------------------------------------------


def serving(settings, encoder, embedder, cases) -> ReasoningService:
    """A reasoning service over a fresh case memory of ``cases`` (and the written policies), read-write."""
    memory = open_case_memory(settings, encoder, embedder=embedder)
    memory.add_cases(cases, batch_size=128)
    library = open_policy_library(settings, embedder=embedder)
    library.add_documents(load_policy_documents(settings.policy_dir))
    workflow = workflow_with((settings, memory, library), EvidenceWeightedLLM(settings=REASONER))
    return ReasoningService(memory, library, workflow, "evidence")


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_case_is_found_by_the_next_review_and_a_new_outcome_replaces_it(backend, tmp_path, scene, encoder,
                                                                            embedder):
    settings = settings_for(backend, tmp_path)
    base = [c for c in scene.stored if c.case_id not in {t.case_id for t in scene.twins}][:150]
    service = serving(settings, encoder, embedder, base)
    memory, request, t = service.memory, request_for(scene.decided), scene.t
    feedback = replace(scene.by_id["known-0"], outcome=Outcome.LEGITIMATE, risk_type="", summary="legit, confirmed")

    async def story():
        before = await service.review(request)
        assert "known-0" not in cited_cases(before.evidence)
        assert await service.add_case(feedback) == len(base) + 1
        after = await service.review(request)
        cited = {x.id: x for x in after.evidence}
        assert cited["case:known-0"].similarity == pytest.approx(1.0, abs=1e-5)
        assert cited["history:known-0"].outcome is Outcome.LEGITIMATE
        changed = replace(feedback, outcome=Outcome.FRAUD, risk_type="account_takeover", summary="re-adjudicated")
        assert await service.add_case(changed) == len(base) + 1  # replaced, not added
        again = {x.id: x for x in (await service.review(request)).evidence}
        assert (again["case:known-0"].outcome, again["case:known-0"].summary) == (Outcome.FRAUD, "re-adjudicated")
        assert memory.similar_cases(changed.features, 1, known_by=t)[0].case == changed
        # a case that says nothing of its label's arrival is known from when it reached the service
        arrived = datetime.now(timezone.utc)
        assert await service.add_case(replace(feedback, case_id="stamped", label_known_at=None)) == len(base) + 2
        (stamped,) = [r.case for r in memory.similar_cases(feedback.features, 3) if r.case.case_id == "stamped"]
        assert arrived <= stamped.label_known_at <= datetime.now(timezone.utc)
        assert "stamped" not in ids(memory.similar_cases(feedback.features, 3, known_by=t))

    try:
        asyncio.run(story())
    finally:
        service.close()
    read_only = open_case_memory(settings, encoder, read_only=True, embedder=embedder)
    library = open_policy_library(settings, read_only=True, embedder=embedder)
    frozen = ReasoningService(read_only, library, service.workflow, "evidence")
    try:
        assert read_only.count() == len(base) + 2  # the writes were durable
        with pytest.raises(CaseMemoryReadOnlyError):
            asyncio.run(frozen.add_case(feedback))
    finally:
        frozen.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_case_and_reviews_do_not_block_the_event_loop(backend, tmp_path, scene, encoder, embedder):
    """While the engine is busy (here: its lock held by another thread for a while, as a long write would),
    writes and reviews wait in threads and the event loop keeps running; then all of them complete."""
    base = [c for c in scene.stored if c.case_id not in {t.case_id for t in scene.twins}][:100]
    service = serving(settings_for(backend, tmp_path), encoder, embedder, base)
    # a blocked loop stops for the whole hold; a free one on a loaded 2-core box was seen to pause 0.52 s (the
    # writes' threads take the GIL), so the limit of hold_s / 2 keeps almost 4x headroom over that
    hold_s = 4.0
    feedback = [replace(c, case_id=f"feedback-{i}") for i, c in enumerate(scene.twins)]

    async def busy_engine():
        engine = service.memory._engine  # the lock every engine call takes
        engine.acquire()
        threading.Timer(hold_s, engine.release).start()
        started = last = time.monotonic()
        work = asyncio.gather(*[service.add_case(c) for c in feedback], service.review(request_for(scene.decided)))
        longest_gap = 0.0
        while not work.done():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            longest_gap, last = max(longest_gap, now - last), now
        *counts, verdict = await work
        return longest_gap, time.monotonic() - started, counts, verdict

    try:
        longest_gap, seconds, counts, verdict = asyncio.run(busy_engine())
    finally:
        service.close()
    # a call that waited for the engine on the loop would have stopped it for the whole hold
    assert seconds >= hold_s and longest_gap < hold_s / 2, (longest_gap, seconds)
    assert counts == [len(base) + i + 1 for i in range(len(feedback))]  # one writer: in call order
    assert [s.name for s in verdict.steps][-1] == "reflection"

"""Case memory on real engines: Qdrant Edge on disk and qdrant-client local mode (a Qdrant server if QDRANT_URL).

The cases are synthetic and built here (random features, fixed seed) with the feature scaling taken from them,
so the expected neighbours can be computed by brute force with numpy and compared with what the engines return.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import uuid
from collections import Counter
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import qdrant_edge
from llama_index.core.schema import MetadataMode, TextNode
from llama_index.core.vector_stores.types import (
    FilterCondition,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
)

from retrieval.case_memory import (
    BehaviourEncoder,
    CaseIndexNotFoundError,
    CaseMemory,
    CaseMemoryReadOnlyError,
    RetrievedCase,
    case_node_id,
    case_to_node,
    node_to_case,
    open_case_memory,
)
from retrieval.case_nodes import case_narrative
from retrieval.edge_store import EdgeShardLockedError, QdrantEdgeVectorStore, edge_point_id
from retrieval.embedding import OnnxMiniLMEmbedding
from retrieval.indexing import build_case_index
from retrieval.narrative import event_narrative
from retrieval.stores import LegacyEdgeLayoutError
from riskcascade.core.config import RetrievalSettings
from riskcascade.core.domain import RISK_TYPES, AdjudicatedCase, Entities, EventType, Outcome
from riskcascade.core.model_card import CalibrationSpec, FeatureScaling, ModelCard, OnnxSpec, Thresholds
from riskcascade.modelling.synthetic import FEATURE_NAMES, generate_events, to_adjudicated_case
from tests.qdrant_server import BACKENDS, SERVER, _delete_server_collections, on_server  # noqa: F401 - fixture

ARTIFACT_DIR = Path(__file__).resolve().parent.parent / "var" / "embedding"  # `make embedding` exports it
N_CASES = 300
FEATURES = [f"f{i:02d}" for i in range(12)]
EVENT_TYPES = list(EventType)


# -- data -------------------------------------------------------------------------------------------------------


def make_cases(n: int, seed: int) -> list[AdjudicatedCase]:
    rng = np.random.default_rng(seed)
    scales = np.linspace(0.5, 40.0, len(FEATURES))
    offsets = np.linspace(-5.0, 100.0, len(FEATURES))
    x = rng.normal(size=(n, len(FEATURES))) * scales + offsets
    start = datetime(2024, 3, 1, tzinfo=timezone.utc)
    cases = []
    for i in range(n):
        fraud = rng.random() < 0.3
        occurred_at = start + timedelta(minutes=i) if i % 5 else None
        cases.append(
            AdjudicatedCase(
                case_id=f"case-{seed}-{i:05d}",
                event_type=EVENT_TYPES[int(rng.integers(len(EVENT_TYPES)))],
                features={name: float(v) for name, v in zip(FEATURES, x[i])},
                outcome=Outcome.FRAUD if fraud else Outcome.LEGITIMATE,
                risk_type=RISK_TYPES[i % len(RISK_TYPES)] if fraud else "",
                entities=None
                if i % 7 == 0
                else Entities(account_id=f"acct-{i % 50}", device_id=f"dev-{i % 30}", ip=f"10.0.0.{i % 200}"),
                occurred_at=occurred_at,
                summary=f"case {i}: {'fraud' if fraud else 'legitimate'} with ünïcode",
                text={"note": f"note {i % 4}: ünïcode"} if i % 3 else {},
                # the outcome arrives days later; some cases never say when
                label_known_at=occurred_at + timedelta(days=1 + i % 9) if occurred_at and i % 4 else None,
            )
        )
    return cases


def model_card_for(cases: list[AdjudicatedCase], features: list[str] = FEATURES) -> ModelCard:
    x = np.array([[c.features[f] for f in features] for c in cases])
    return ModelCard(
        version="test",
        created_at="2024-03-01T00:00:00Z",
        feature_names=list(features),
        feature_descriptions={f: f for f in features},
        calibration=CalibrationSpec(a=1.0, b=0.0),
        thresholds=Thresholds(band_low=0.1, band_high=0.9, target_escalation_share=0.1),
        onnx=OnnxSpec(parity_max_abs_diff=0.0),
        feature_scaling=FeatureScaling(mean=x.mean(axis=0).tolist(), std=x.std(axis=0).tolist()),
    )


@pytest.fixture(scope="module")
def cases() -> list[AdjudicatedCase]:
    return make_cases(N_CASES, seed=11)


@pytest.fixture(scope="module")
def encoder(cases) -> BehaviourEncoder:
    return BehaviourEncoder.from_model_card(model_card_for(cases))


def settings_for(backend: str, root: Path, **overrides) -> RetrievalSettings:
    """Settings of a memory under ``root``: Qdrant Edge, qdrant-client's local mode, or (SERVER) a Qdrant server."""
    where: dict = {"backend": backend, "edge_path": root / "edge", "qdrant_path": root / "local",
                   "collection": "cases_test"}
    if backend == SERVER:
        where = {"edge_path": root / "edge", **on_server(root, collection="cases_test")}
    return RetrievalSettings(
        **where,
        index_batch_size=64,
        embedding_dir=ARTIFACT_DIR,
        **overrides,
    )


@pytest.fixture(scope="module", params=BACKENDS)
def filled(request, tmp_path_factory, cases, encoder) -> CaseMemory:
    """One filled memory per backend, shared by the read-only tests."""
    memory = open_case_memory(settings_for(request.param, tmp_path_factory.mktemp(request.param)), encoder)
    memory.add_cases(cases, batch_size=64)
    yield memory
    memory.close()


def brute_force(encoder, cases, features, top_k, keep=lambda c: True) -> list[tuple[str, float]]:
    """Exact cosine top-k with numpy: what the engines should return."""
    pool = [c for c in cases if keep(c)]
    vectors = encoder.encode_many([c.features for c in pool])
    query = np.asarray(encoder.encode(features))
    sims = vectors @ query / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(query))
    order = np.argsort(-sims, kind="stable")[:top_k]
    return [(pool[i].case_id, float(sims[i])) for i in order]


def ids_and_sims(hits: list[RetrievedCase]) -> tuple[list[str], list[float]]:
    return [h.case.case_id for h in hits], [h.similarity for h in hits]


# -- behaviour encoder ------------------------------------------------------------------------------------------


def test_encoder_standardises_in_model_card_order():
    encoder = BehaviourEncoder(["b", "a", "c"], mean=[10.0, 0.0, -1.0], std=[2.0, 1.0, 0.5])
    assert encoder.dimension == 3
    assert encoder.encode({"a": 3.0, "b": 14.0, "c": -2.0, "ignored": 99.0}) == pytest.approx([2.0, 3.0, -2.0])


def test_encoder_missing_and_nan_are_the_mean_and_values_are_clipped():
    encoder = BehaviourEncoder(["a", "b", "c", "d"], mean=[0.0, 5.0, 0.0, 3.0], std=[1.0, 1.0, 0.1, 0.0])
    vector = encoder.encode({"a": float("nan"), "c": 1e6, "d": 100.0})
    # a NaN → 0, b missing → 0, c clipped to +8, d has no training variance → 0
    assert vector == [0.0, 0.0, 8.0, 0.0]
    assert encoder.encode({"c": float("-inf")})[2] == -8.0


def test_encoder_rejects_scaling_that_does_not_match_the_features():
    with pytest.raises(ValueError, match="2 names, 3 means"):
        BehaviourEncoder(["a", "b"], mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])


def test_encoder_from_model_card(cases, encoder):
    card = model_card_for(cases)
    assert encoder.feature_names == tuple(card.feature_names)
    # standardised over the data the scaling came from: mean ~0, std ~1 per feature
    z = encoder.encode_many([c.features for c in cases])
    assert np.allclose(z.mean(axis=0), 0.0, atol=1e-9)
    assert np.allclose(z.std(axis=0), 1.0, atol=1e-9)


# -- cases as nodes ---------------------------------------------------------------------------------------------


def test_case_survives_the_round_trip_through_a_node(cases, encoder):
    for case in cases[:10]:
        assert node_to_case(case_to_node(case, encoder.encode(case.features))) == case
    odd = replace(cases[0], features={"f00": float("nan"), "f01": 2.0}, entities=None, occurred_at=None)
    rebuilt = node_to_case(case_to_node(odd, encoder.encode(odd.features)))
    assert math.isnan(rebuilt.features["f00"]) and rebuilt.features["f01"] == 2.0
    assert rebuilt.entities is None and rebuilt.occurred_at is None
    assert any(c.label_known_at for c in cases[:10]) and any(c.label_known_at is None for c in cases[:10])
    offset = replace(cases[1], label_known_at=datetime(2024, 3, 2, 9, tzinfo=timezone(timedelta(hours=9))))
    node = case_to_node(offset, encoder.encode(offset.features))
    assert node.metadata["label_known_at"] == "2024-03-02T00:00:00+00:00"  # stored in UTC, like occurred_at
    assert node_to_case(node).label_known_at == offset.label_known_at


# -- both backends ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_count_and_idempotent_readd(backend, tmp_path, cases, encoder):
    some = cases[:80]
    with open_case_memory(settings_for(backend, tmp_path), encoder) as memory:
        assert memory.count() == 0
        assert memory.add_cases(iter(some), batch_size=32) == 80  # a generator works: batches are taken lazily
        assert memory.count() == 80
        assert memory.add_cases(some, batch_size=25, progress=True) == 80
        assert memory.count() == 80
        changed = replace(some[3], summary="re-adjudicated", outcome=Outcome.FRAUD, risk_type="collusion")
        memory.add_cases([changed], batch_size=1)
        assert memory.count() == 80
        top = memory.similar_cases(changed.features, top_k=1)[0]
        assert top.case == changed


def test_own_features_find_the_case_itself_with_similarity_one(filled, cases, encoder):
    assert filled.count() == N_CASES
    for case in cases[::37]:
        hits = filled.similar_cases(case.features, top_k=5)
        assert hits[0].case == case  # the whole case comes back, rebuilt from the stored node
        assert hits[0].similarity == pytest.approx(1.0, abs=1e-6)
        expected = brute_force(encoder, cases, case.features, 5)
        assert [h.case.case_id for h in hits] == [cid for cid, _ in expected]
        assert [h.similarity for h in hits] == pytest.approx([s for _, s in expected], abs=1e-5)
        assert all(-1.0 <= h.similarity <= 1.0 for h in hits)


def test_exclude_case_ids(filled, cases, encoder):
    case = cases[42]
    first = filled.similar_cases(case.features, top_k=4)
    excluded = [case.case_id, first[1].case.case_id]
    hits = filled.similar_cases(case.features, top_k=4, exclude_case_ids=excluded)
    assert len(hits) == 4
    assert not {h.case.case_id for h in hits} & set(excluded)
    expected = brute_force(encoder, cases, case.features, 4, keep=lambda c: c.case_id not in excluded)
    assert [h.case.case_id for h in hits] == [cid for cid, _ in expected]


def test_event_type_filter(filled, cases, encoder):
    case = cases[7]
    for event_type in (EventType.PAYOUT, EventType.LOGIN):
        hits = filled.similar_cases(case.features, top_k=6, event_type=event_type)
        assert len(hits) == 6 and {h.case.event_type for h in hits} == {event_type}
        expected = brute_force(encoder, cases, case.features, 6, keep=lambda c, t=event_type: c.event_type == t)
        assert ids_and_sims(hits)[0] == [cid for cid, _ in expected]
    both = filled.similar_cases(
        case.features, top_k=3, exclude_case_ids=[case.case_id], event_type=case.event_type
    )
    assert all(h.case.event_type == case.event_type and h.case.case_id != case.case_id for h in both)


def test_missing_features_still_query(filled, cases):
    hits = filled.similar_cases({"f03": cases[0].features["f03"]}, top_k=3)
    assert len(hits) == 3


def test_backends_return_the_same_cases_and_similarities(tmp_path, cases, encoder):
    queries = make_cases(15, seed=99)  # unseen events
    with open_case_memory(settings_for("edge", tmp_path), encoder) as edge, open_case_memory(
        settings_for("qdrant", tmp_path), encoder
    ) as local:
        edge.add_cases(cases, batch_size=100)
        local.add_cases(cases, batch_size=100)
        for i, query in enumerate(queries):
            kwargs = {}
            if i % 3 == 1:
                kwargs["event_type"] = query.event_type
            if i % 3 == 2:
                kwargs["exclude_case_ids"] = [c.case_id for c in cases[:40]]
            edge_ids, edge_sims = ids_and_sims(edge.similar_cases(query.features, top_k=10, **kwargs))
            local_ids, local_sims = ids_and_sims(local.similar_cases(query.features, top_k=10, **kwargs))
            assert edge_ids == local_ids
            assert edge_sims == pytest.approx(local_sims, abs=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_build_case_index_is_idempotent(backend, tmp_path, cases, encoder):
    settings = settings_for(backend, tmp_path)
    first = build_case_index(settings, cases[:100], encoder, progress=False)
    assert (first.added, first.new, first.total, first.backend) == (100, 100, 100, backend)
    again = build_case_index(settings, cases[:120], encoder, progress=False)
    assert (again.added, again.new, again.total) == (120, 20, 120)
    assert again.seconds > 0 and again.location


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_only_memory_neither_creates_nor_writes(backend, tmp_path, cases, encoder):
    settings = settings_for(backend, tmp_path)
    with pytest.raises(CaseIndexNotFoundError, match="`index` command"):
        open_case_memory(settings, encoder, read_only=True)
    build_case_index(settings, cases[:20], encoder, progress=False)
    with open_case_memory(settings, encoder, read_only=True) as memory:
        assert memory.count() == 20
        with pytest.raises(CaseMemoryReadOnlyError):
            memory.add_cases(cases[20:30], batch_size=10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_index_built_for_other_features_is_refused(backend, tmp_path, cases, encoder):
    settings = settings_for(backend, tmp_path)
    build_case_index(settings, cases[:10], encoder, progress=False)
    other = BehaviourEncoder(["a", "b"], [0.0, 0.0], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"vector size 2|2-d cosine"):
        open_case_memory(settings, other)


# -- Qdrant Edge specifics --------------------------------------------------------------------------------------


def test_edge_shard_reopened_from_disk_keeps_its_points(tmp_path, cases, encoder):
    settings = settings_for("edge", tmp_path)
    with open_case_memory(settings, encoder) as memory:
        memory.add_cases(cases, batch_size=64)
        before = memory.similar_cases(cases[3].features, top_k=5)
    with open_case_memory(settings, encoder, read_only=True) as memory:
        assert memory.count() == N_CASES
        assert memory.similar_cases(cases[3].features, top_k=5) == before
        # payload indexes were created on the shard and persist with it
        schema = memory.vector_store.client.info().payload_schema
        assert {"case_id", "outcome", "risk_type", "event_type", "doc_id", "occurred_at", "ip"} <= set(schema)
        assert schema["label_known_at"].data_type == qdrant_edge.PayloadSchemaType.Datetime  # served by known_by
        assert memory.location == str(tmp_path / "edge" / "cases_test")  # one shard folder per collection


def test_edge_shard_is_locked_by_a_second_store_in_this_process(tmp_path, encoder):
    path = tmp_path / "shard"
    first = QdrantEdgeVectorStore(path, encoder.dimension)
    with pytest.raises(EdgeShardLockedError) as err:
        QdrantEdgeVectorStore(path, encoder.dimension)
    assert str(path) in str(err.value) and "another process" in str(err.value)
    first.close()
    QdrantEdgeVectorStore(path, encoder.dimension).close()  # closing released the lock


def test_edge_shard_is_locked_by_another_process(tmp_path, encoder):
    path = tmp_path / "shard"
    child = textwrap.dedent(
        f"""
        from retrieval.edge_store import EdgeShardLockedError, QdrantEdgeVectorStore
        try:
            QdrantEdgeVectorStore({str(path)!r})
        except EdgeShardLockedError as exc:
            print(exc)
            raise SystemExit(3)
        """
    )
    with QdrantEdgeVectorStore(path, encoder.dimension):
        result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr
    assert f"Qdrant Edge shard folder {path} is locked" in result.stdout
    assert "another process" in result.stdout


def _node(i: int, **metadata) -> TextNode:
    vector = [math.cos(i / 10), math.sin(i / 10), 1.0]
    return TextNode(id_=f"n{i}", text=f"text {i}", embedding=vector, metadata={"i": i, **metadata})


FILTER_CASES = [
    (MetadataFilter(key="colour", value="red"), lambda m: m["colour"] == "red"),
    (MetadataFilter(key="colour", value="red", operator=FilterOperator.NE), lambda m: m["colour"] != "red"),
    (
        MetadataFilter(key="colour", value=["red", "blue"], operator=FilterOperator.IN),
        lambda m: m["colour"] in ("red", "blue"),
    ),
    (
        MetadataFilter(key="colour", value=["red", "blue"], operator=FilterOperator.NIN),
        lambda m: m["colour"] not in ("red", "blue"),
    ),
    (MetadataFilter(key="i", value=[1, 2, 3], operator=FilterOperator.IN), lambda m: m["i"] in (1, 2, 3)),
    (MetadataFilter(key="i", value=30, operator=FilterOperator.GTE), lambda m: m["i"] >= 30),
    (
        MetadataFilters(
            filters=[
                MetadataFilter(key="colour", value="green", operator=FilterOperator.NE),
                MetadataFilter(key="i", value=20, operator=FilterOperator.LT),
                MetadataFilter(key="shape", value=["round"], operator=FilterOperator.NIN),
            ],
            condition=FilterCondition.AND,
        ),
        lambda m: m["colour"] != "green" and m["i"] < 20 and m["shape"] != "round",
    ),
    (
        MetadataFilters(
            filters=[MetadataFilter(key="colour", value="red"), MetadataFilter(key="shape", value="square")],
            condition=FilterCondition.OR,
        ),
        lambda m: m["colour"] == "red" or m["shape"] == "square",
    ),
    (
        MetadataFilters(
            filters=[
                MetadataFilter(key="i", value=30, operator=FilterOperator.LT),
                MetadataFilters(
                    filters=[MetadataFilter(key="colour", value="red"), MetadataFilter(key="shape", value="round")],
                    condition=FilterCondition.OR,
                ),
                MetadataFilters(filters=[MetadataFilter(key="i", value=[4, 10], operator=FilterOperator.IN)],
                                condition=FilterCondition.NOT),
                MetadataFilters(filters=[MetadataFilter(key="i", value=1, operator=FilterOperator.GT)]),
            ],
            condition=FilterCondition.AND,
        ),
        lambda m: 1 < m["i"] < 30 and (m["colour"] == "red" or m["shape"] == "round") and m["i"] not in (4, 10),
    ),
    (
        MetadataFilters(filters=[MetadataFilter(key="colour", value="red")], condition=FilterCondition.NOT),
        lambda m: m["colour"] != "red",
    ),
]


@pytest.mark.parametrize(
    "metadata_filter,keep",
    FILTER_CASES,
    ids=["eq", "ne", "in-str", "nin-str", "in-int", "gte", "and-ne-lt-nin", "or-eq-eq", "nested", "not"],
)
def test_edge_store_metadata_filters(tmp_path, metadata_filter, keep):
    colours, shapes = ["red", "green", "blue"], ["round", "square"]
    nodes = [_node(i, colour=colours[i % 3], shape=shapes[i % 2]) for i in range(40)]
    with QdrantEdgeVectorStore(tmp_path / "shard", 3, keyword_index_fields=["colour", "shape"]) as store:
        store.add(nodes)
        filters = metadata_filter if isinstance(metadata_filter, MetadataFilters) else MetadataFilters(
            filters=[metadata_filter]
        )
        result = store.query(VectorStoreQuery(query_embedding=[1.0, 0.0, 1.0], similarity_top_k=100, filters=filters))
        expected = {n.node_id for n in nodes if keep(n.metadata)}
        assert expected and set(result.ids) == expected
        assert result.similarities == sorted(result.similarities, reverse=True)


def test_edge_store_add_delete_and_rebuild_nodes(tmp_path):
    from llama_index.core.schema import NodeRelationship, RelatedNodeInfo

    nodes = [_node(i) for i in range(10)]
    for node in nodes:
        node.relationships[NodeRelationship.SOURCE] = RelatedNodeInfo(node_id=f"doc-{node.metadata['i'] % 2}")
    with QdrantEdgeVectorStore(tmp_path / "shard", 3) as store:
        assert store.add(nodes) == [n.node_id for n in nodes]
        store.add(nodes)
        assert store.count() == 10
        # point ids: uuid5 of a non-UUID node id, the id itself when it is a UUID
        assert edge_point_id("n1") == edge_point_id("n1") != edge_point_id("n2")
        assert edge_point_id(case_node_id("case-1")) == case_node_id("case-1")
        (got,) = store.get_nodes(node_ids=["n4"])
        assert (got.node_id, got.text, got.metadata, got.ref_doc_id) == ("n4", "text 4", {"i": 4}, "doc-0")
        top = store.query(VectorStoreQuery(query_embedding=nodes[4].embedding, similarity_top_k=1))
        assert top.ids == ["n4"] and top.similarities[0] == pytest.approx(1.0, abs=1e-6)
        store.delete("doc-1")
        assert store.count() == 5 and {n.metadata["i"] % 2 for n in store.get_nodes()} == {0}
        store.delete_nodes(node_ids=["n0", "n2"])
        assert store.count() == 3


# -- narratives -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedder() -> OnnxMiniLMEmbedding:
    if not (ARTIFACT_DIR / "manifest.json").is_file():
        pytest.fail(f"no embedding artefact in {ARTIFACT_DIR}: run `make embedding`", pytrace=False)
    return OnnxMiniLMEmbedding(ARTIFACT_DIR)


@pytest.fixture(scope="module")
def stories() -> list[AdjudicatedCase]:
    """Synthetic marketplace cases: real feature names and notes, so narratives say something (some repeat)."""
    return [to_adjudicated_case(e) for e in generate_events(400, seed=3)]


@pytest.fixture(scope="module")
def story_encoder(stories) -> BehaviourEncoder:
    return BehaviourEncoder.from_model_card(model_card_for(stories, list(FEATURE_NAMES)))


@pytest.fixture(scope="module", params=BACKENDS)
def told(request, tmp_path_factory, stories, story_encoder, embedder) -> CaseMemory:
    """One memory of the synthetic stories per backend."""
    root = tmp_path_factory.mktemp(f"stories-{request.param}")
    memory = open_case_memory(settings_for(request.param, root), story_encoder, embedder=embedder)
    memory.add_cases(stories, batch_size=64)
    yield memory
    memory.close()


def brute_force_narratives(embedder, cases, text, top_k, keep=lambda c: True) -> list[tuple[str, float]]:
    pool = [c for c in cases if keep(c)]
    vectors = embedder.embed([case_narrative(c) for c in pool])
    sims = vectors @ embedder.embed([text])[0]
    order = sorted(range(len(pool)), key=lambda i: (-sims[i], pool[i].case_id))[:top_k]
    return [(pool[i].case_id, float(sims[i])) for i in order]


def test_case_node_keeps_free_text_and_narrative(stories, story_encoder):
    case = next(c for c in stories if c.text)
    node = case_to_node(case, story_encoder.encode(case.features))
    assert node.metadata["narrative"] == case_narrative(case) and node_to_case(node).text == case.text
    assert "fraud" not in node.metadata["narrative"] and case.text["note"] in node.metadata["narrative"]
    # neither features nor free text reach an LLM through the node's own rendering
    assert "narrative" not in node.get_content(metadata_mode=MetadataMode.LLM)


def test_a_narrative_finds_its_case_and_ranks_like_brute_force(told, stories, embedder):
    assert told.count() == len(stories)
    for case in stories[::53]:
        text = case_narrative(case)
        hits = told.similar_narratives(text, top_k=6)
        assert {h.via for h in hits} == {"narrative"}
        assert hits[0].similarity == pytest.approx(1.0, abs=1e-5)
        assert case_narrative(hits[0].case) == text  # the case itself, or one told the same way
        expected = brute_force_narratives(embedder, stories, text, 6)
        assert [h.similarity for h in hits] == pytest.approx([s for _, s in expected], abs=1e-5)
        assert [h.case.case_id for h in hits] == [cid for cid, _ in expected]


def test_narrative_query_of_an_unseen_event(told, stories, embedder):
    event = to_adjudicated_case(generate_events(300, seed=8)[17])
    text = event_narrative(event.event_type, event.features, event.text)
    hits = told.similar_narratives(text, top_k=5, event_type=event.event_type, exclude_case_ids=[stories[0].case_id])
    assert len(hits) == 5 and {h.case.event_type for h in hits} == {event.event_type}
    expected = brute_force_narratives(embedder, stories, text, 5, keep=lambda c: c.event_type == event.event_type)
    assert [h.case.case_id for h in hits] == [cid for cid, _ in expected]
    assert told.similar_narratives(text, top_k=0) == []


def test_identical_narratives_tie_and_break_by_case_id(told, stories):
    counts = Counter(case_narrative(c) for c in stories)
    text, n = counts.most_common(1)[0]
    assert n >= 2, "the fixture should hold a narrative told more than once"
    hits = told.similar_narratives(text, top_k=n - 1)  # the cut falls inside the tie
    same = sorted(c.case_id for c in stories if case_narrative(c) == text)
    assert [h.case.case_id for h in hits] == same[: n - 1]


def test_behaviour_and_narrative_search_agree_across_backends(tmp_path, stories, story_encoder, embedder):
    queries = [to_adjudicated_case(e) for e in generate_events(240, seed=21)[:12]]
    with open_case_memory(settings_for("edge", tmp_path), story_encoder, embedder=embedder) as edge, \
            open_case_memory(settings_for("qdrant", tmp_path), story_encoder, embedder=embedder) as local:
        edge.add_cases(stories, batch_size=100)
        local.add_cases(stories, batch_size=100)
        for i, query in enumerate(queries):
            kwargs = {"event_type": query.event_type} if i % 2 else {"exclude_case_ids": [stories[5].case_id]}
            text = event_narrative(query.event_type, query.features, query.text)
            for a, b in (
                (edge.similar_narratives(text, 8, **kwargs), local.similar_narratives(text, 8, **kwargs)),
                (edge.similar_cases(query.features, 8, **kwargs), local.similar_cases(query.features, 8, **kwargs)),
            ):
                assert ids_and_sims(a)[0] == ids_and_sims(b)[0]
                assert ids_and_sims(a)[1] == pytest.approx(ids_and_sims(b)[1], abs=1e-5)


def test_both_backends_store_the_same_payload(tmp_path, stories, story_encoder, embedder):
    some = stories[:25]
    ids = [case_node_id(c.case_id) for c in some]
    with open_case_memory(settings_for("edge", tmp_path), story_encoder, embedder=embedder) as edge, \
            open_case_memory(settings_for("qdrant", tmp_path), story_encoder, embedder=embedder) as local:
        edge.add_cases(some, batch_size=10)
        local.add_cases(some, batch_size=10)
        edge_payloads = {str(r.id): r.payload for r in edge.vector_store.client.retrieve(ids, True, False)}
        local_payloads = {
            str(r.id): r.payload
            for r in local.vector_store.client.retrieve(local.vector_store.collection_name, ids, with_payload=True)
        }
    assert len(edge_payloads) == len(some) and edge_payloads == local_payloads


# -- entity history ---------------------------------------------------------------------------------------------


def recent_first(cases, field, value, limit, exclude=()) -> list[str]:
    """What cases_with_entity should return, by brute force."""
    mine = [c for c in cases if c.entities is not None and getattr(c.entities, field) == value]
    mine.sort(key=lambda c: c.case_id)
    mine.sort(key=lambda c: (c.occurred_at is not None, c.occurred_at or datetime.min.replace(tzinfo=timezone.utc)),
              reverse=True)
    return [c.case_id for c in mine if c.case_id not in exclude][:limit]


@pytest.mark.parametrize("field", ["account_id", "device_id", "ip", "payment_instrument_id", "seller_id"])
def test_cases_with_entity_most_recent_first(told, stories, field):
    values = Counter(getattr(c.entities, field) for c in stories if getattr(c.entities, field))
    for value, _ in values.most_common(3):
        for limit in (1, 3, 50):
            got = told.cases_with_entity(field, value, limit)
            assert [c.case_id for c in got] == recent_first(stories, field, value, limit)
            assert all(getattr(c.entities, field) == value for c in got)
        newest = told.cases_with_entity(field, value, 1)[0].case_id
        rest = told.cases_with_entity(field, value, 2, exclude_case_ids=[newest])
        assert [c.case_id for c in rest] == recent_first(stories, field, value, 2, exclude=[newest])


def history_cases() -> list[AdjudicatedCase]:
    """One account's cases with tied times and missing times, out of order, among other accounts' cases."""
    at = datetime(2025, 3, 1, tzinfo=timezone.utc)
    times = [at, at + timedelta(hours=1), None, at + timedelta(hours=1), at, None, at + timedelta(hours=2), at]
    mine = [
        AdjudicatedCase(
            case_id=f"hist-{i:02d}",
            event_type=EventType.LOGIN,
            features={"f00": float(i)},
            outcome=Outcome.LEGITIMATE,
            entities=Entities(account_id="acct-x", device_id=f"dev-{i % 2}"),
            occurred_at=when,
        )
        for i, when in enumerate(times)
    ]
    # the same instant written with another offset is the same time
    mine.append(replace(mine[1], case_id="hist-08", occurred_at=(at + timedelta(hours=1)).astimezone(
        timezone(timedelta(hours=5)))))
    others = [replace(c, case_id=f"other-{i}", entities=Entities(account_id="acct-y")) for i, c in enumerate(mine)]
    return mine + others


@pytest.mark.parametrize("backend", BACKENDS)
def test_entity_history_breaks_ties_by_case_id_and_puts_undated_last(backend, tmp_path, encoder, embedder):
    cases = history_cases()
    with open_case_memory(settings_for(backend, tmp_path), encoder, embedder=embedder) as memory:
        memory.add_cases(cases, batch_size=4)
        for limit in range(1, 12):
            got = [c.case_id for c in memory.cases_with_entity("account_id", "acct-x", limit)]
            assert got == recent_first(cases, "account_id", "acct-x", limit)
        assert [c.case_id for c in memory.cases_with_entity("account_id", "acct-x", 4)] == [
            "hist-06", "hist-01", "hist-03", "hist-08"
        ]
        excluded = memory.cases_with_entity("account_id", "acct-x", 3, exclude_case_ids=["hist-06", "hist-03"])
        assert [c.case_id for c in excluded] == ["hist-01", "hist-08", "hist-00"]
        assert memory.cases_with_entity("account_id", "acct-x", 0) == []
        assert memory.cases_with_entity("device_id", "", 5) == []  # no entity is not an entity
        assert memory.cases_with_entity("account_id", "acct-nobody", 5) == []


def test_neighbour_cases_leave_the_account_itself_out(told, stories):
    busiest = Counter(c.entities.ip for c in stories).most_common(1)[0][0]
    accounts = Counter(c.entities.account_id for c in stories if c.entities.ip == busiest)
    account = accounts.most_common(1)[0][0]
    others = [c for c in stories if c.entities.account_id != account]
    got = told.cases_with_entity("ip", busiest, 5, other_than_account=account)
    assert [c.case_id for c in got] == recent_first(others, "ip", busiest, 5)
    assert got and all(c.entities.account_id != account for c in got)


def test_cases_with_entity_rejects_other_fields(told):
    with pytest.raises(ValueError, match="'email'"):
        told.cases_with_entity("email", "a@b.c", 5)
    with pytest.raises(ValueError, match="'event_type'"):
        told.cases_with_entity("event_type", "login", 5)


# -- stores -----------------------------------------------------------------------------------------------------


def test_edge_store_with_several_vectors(tmp_path):
    nodes = [_node(i) for i in range(20)]
    extra = [{"other": [1.0, float(i)]} for i in range(20)]
    with QdrantEdgeVectorStore(tmp_path / "shard", 3, extra_vectors={"other": 2}) as store:
        assert store.vector_names == ("behaviour", "other")
        store.add(nodes, named_vectors=extra)
        by_default = store.query(VectorStoreQuery(query_embedding=nodes[4].embedding, similarity_top_k=1))
        by_other = store.query(VectorStoreQuery(query_embedding=[1.0, 19.0], similarity_top_k=1), vector_name="other")
        assert by_default.ids == ["n4"] and by_other.ids == ["n19"]
        with pytest.raises(ValueError, match="no vector 'nope'"):
            store.query(VectorStoreQuery(query_embedding=[1.0, 0.0], similarity_top_k=1), vector_name="nope")
        with pytest.raises(ValueError, match="unknown extra vectors"):
            store.add(nodes[:1], named_vectors=[{"nope": [1.0]}])
        assert store.count(MetadataFilters(filters=[MetadataFilter(key="i", value=3, operator=FilterOperator.LT)])) == 3
    # the shard holds both vectors: opening it as a single-vector shard is refused
    with pytest.raises(ValueError, match="does not match the requested vectors"):
        QdrantEdgeVectorStore(tmp_path / "shard", 3)


def test_legacy_single_shard_edge_path_is_refused(tmp_path, encoder, embedder):
    QdrantEdgeVectorStore(tmp_path / "edge", encoder.dimension).close()  # the old layout: edge_path is the shard
    with pytest.raises(LegacyEdgeLayoutError, match="rm -r"):
        open_case_memory(settings_for("edge", tmp_path), encoder, embedder=embedder)


def test_qdrant_local_mode_shares_its_folder_between_collections(tmp_path, encoder, embedder, cases):
    settings = settings_for("qdrant", tmp_path)
    other = settings.model_copy(update={"collection": "cases_other"})
    with open_case_memory(settings, encoder, embedder=embedder) as first:
        with open_case_memory(other, encoder, embedder=embedder) as second:
            first.add_cases(cases[:5], batch_size=5)
            second.add_cases(cases[:3], batch_size=5)
        assert first.count() == 5  # closing the second did not close the shared client
    with open_case_memory(other, encoder, read_only=True, embedder=embedder) as again:
        assert again.count() == 3


# -- a real Qdrant server ---------------------------------------------------------------------------------------


@pytest.mark.qdrant_server
def test_against_a_real_qdrant_server(tmp_path, stories, story_encoder, embedder):
    url = os.environ.get("QDRANT_URL")
    if not url:
        pytest.skip("set QDRANT_URL to run against a real Qdrant server")
    settings = RetrievalSettings(
        backend="qdrant",
        qdrant_url=url,
        qdrant_api_key=os.environ.get("QDRANT_API_KEY"),
        collection=f"riskcascade_test_{uuid.uuid4().hex[:12]}",
        embedding_dir=ARTIFACT_DIR,
    )
    server = open_case_memory(settings, story_encoder, embedder=embedder)
    try:
        server.add_cases(stories, batch_size=100)
        server.add_cases(stories, batch_size=100)
        assert server.count() == len(stories)
        with open_case_memory(settings_for("edge", tmp_path), story_encoder, embedder=embedder) as edge:
            edge.add_cases(stories, batch_size=100)
            for query in [to_adjudicated_case(e) for e in generate_events(240, seed=5)[:5]]:
                text = event_narrative(query.event_type, query.features, query.text)
                for kwargs in ({}, {"event_type": query.event_type}, {"exclude_case_ids": [stories[0].case_id]}):
                    for search, arg in ((CaseMemory.similar_cases, query.features),
                                        (CaseMemory.similar_narratives, text)):
                        a = ids_and_sims(search(server, arg, 10, **kwargs))
                        b = ids_and_sims(search(edge, arg, 10, **kwargs))
                        assert a[0] == b[0] and a[1] == pytest.approx(b[1], abs=1e-5)
                account = query.entities.account_id if query.entities else ""
                for field, value in (("account_id", account), ("ip", stories[3].entities.ip)):
                    assert server.cases_with_entity(field, value, 5) == edge.cases_with_entity(field, value, 5)
        own = server.similar_cases(stories[9].features, top_k=1)[0]
        assert own.case == stories[9] and own.similarity == pytest.approx(1.0, abs=1e-6)
        # the server was given payload indexes for every filtered key (local mode ignores them)
        schema = server.vector_store.client.get_collection(settings.collection).payload_schema
        assert {"case_id", "event_type", "account_id", "ip", "occurred_at", "label_known_at", "doc_id"} <= set(schema)
    finally:
        server.vector_store.client.delete_collection(settings.collection)
        server.close()

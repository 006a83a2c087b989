"""The policy library on real engines: parsing, chunking, ingest and search on Qdrant Edge and qdrant-client local
mode (a Qdrant server too when QDRANT_URL is set)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

from retrieval.case_memory import BehaviourEncoder, open_case_memory
from retrieval.embedding import OnnxMiniLMEmbedding
from retrieval.indexing import build_policy_index, policy_dir_digest
from retrieval.policy_documents import TokenBudget
from retrieval.policy_library import (
    PolicyFormatError,
    PolicyIndexNotFoundError,
    chunk_policy,
    load_policy_documents,
    open_policy_library,
)
from riskcascade.core.config import RetrievalSettings
from riskcascade.core.domain import RISK_TYPES
from tests.qdrant_server import BACKENDS, SERVER, _delete_server_collections, on_server  # noqa: F401 - fixture

REPO = Path(__file__).resolve().parent.parent
POLICY_DIR = REPO / "retrieval" / "policies"
ARTIFACT_DIR = REPO / "var" / "embedding"
GOOD_FRONT = "policy_id: POL-X\nrisk_type: x\nversion: 2026-01-01\ntitle: X\nallowed_actions: [APPROVE, REVIEW]\n"
GOOD_BODY = "# X\n\n## Signals\n\nX signals.\n\n- **X-1** one rule: REVIEW.\n"


@pytest.fixture(scope="module")
def embedder() -> OnnxMiniLMEmbedding:
    if not (ARTIFACT_DIR / "manifest.json").is_file():
        pytest.fail(f"no embedding artefact in {ARTIFACT_DIR}: run `make embedding`", pytrace=False)
    return OnnxMiniLMEmbedding(ARTIFACT_DIR)


@pytest.fixture(scope="module")
def documents():
    return load_policy_documents(POLICY_DIR)


def settings_for(backend: str, root: Path, policy_dir: Path = POLICY_DIR) -> RetrievalSettings:
    """Settings of a library under ``root``: Qdrant Edge, qdrant-client's local mode, or (SERVER) a Qdrant server."""
    where: dict = {"backend": backend, "edge_path": root / "edge", "qdrant_path": root / "local",
                   "policy_collection": "policies_test", "collection": "cases_test"}
    if backend == SERVER:
        where = {"edge_path": root / "edge",
                 **on_server(root, policy_collection="policies_test", collection="cases_test")}
    return RetrievalSettings(**where, policy_dir=policy_dir, embedding_dir=ARTIFACT_DIR)


@pytest.fixture(scope="module", params=BACKENDS)
def library(request, tmp_path_factory, documents, embedder):
    root = tmp_path_factory.mktemp(f"policies-{request.param}")
    lib = open_policy_library(settings_for(request.param, root), embedder=embedder)
    lib.add_documents(documents)
    yield lib
    lib.close()


# -- parsing ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,problem",
    [
        ("# no front matter\n", "front matter block"),
        ("---\npolicy_id: [unclosed\n---\n" + GOOD_BODY, "not valid YAML"),
        ("---\n- a list\n---\n" + GOOD_BODY, "not a mapping"),
        ("---\n" + GOOD_FRONT.replace("title: X\n", "") + "---\n" + GOOD_BODY, "lacks title"),
        ("---\n" + GOOD_FRONT + "owner: me\n---\n" + GOOD_BODY, "unknown keys owner"),
        ("---\n" + GOOD_FRONT.replace("POL-X", "pol-x") + "---\n" + GOOD_BODY, "policy_id 'pol-x'"),
        ("---\n" + GOOD_FRONT.replace("[APPROVE, REVIEW]", "[ALLOW]") + "---\n" + GOOD_BODY, "allowed_actions"),
        ("---\n" + GOOD_FRONT + "---\n# X\n\nno sections\n", "no '## ' sections"),
        ("---\n" + GOOD_FRONT + "---\n" + GOOD_BODY + "\n## Signals\n\nagain\n", "'## Signals' appears twice"),
    ],
    ids=["no-front", "bad-yaml", "not-mapping", "missing-key", "unknown-key", "bad-id", "bad-action", "no-sections",
         "twice"],
)
def test_parsing_errors_name_the_file_and_the_problem(tmp_path, text, problem):
    (tmp_path / "broken_policy.md").write_text(text)
    with pytest.raises(PolicyFormatError) as err:
        load_policy_documents(tmp_path)
    assert str(err.value).startswith("broken_policy.md: ") and problem in str(err.value)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no policy folder"):
        load_policy_documents(tmp_path / "missing")
    (tmp_path / "README.md").write_text("# not a policy\n")
    with pytest.raises(FileNotFoundError, match=r"no policy documents \(\*\.md\)"):
        load_policy_documents(tmp_path)
    (tmp_path / "a.md").write_text("---\n" + GOOD_FRONT + "---\n" + GOOD_BODY)
    (tmp_path / "b.md").write_text("---\n" + GOOD_FRONT.replace("POL-X", "POL-Y") + "---\n" + GOOD_BODY)
    with pytest.raises(PolicyFormatError, match="b.md: risk_type 'x' is also used by a.md"):
        load_policy_documents(tmp_path)


# -- chunking ---------------------------------------------------------------------------------------------------


def test_chunks_carry_rule_ids_and_fit_the_embedder(documents):
    budget = TokenBudget.of_artifact(ARTIFACT_DIR)
    assert budget.max_tokens == 256
    ids = []
    for doc in documents:
        chunks = chunk_policy(doc, budget)
        assert chunk_policy(doc, budget) == chunks  # stable
        ids += [c.chunk_id for c in chunks]
        # every rule is in exactly one chunk, in the chunk of its section
        located = {rule: c for c in chunks for rule in c.rule_ids}
        assert sorted(located) == sorted(r.rule_id for r in doc.rules)
        assert all(located[r.rule_id].section == r.section for r in doc.rules)
        assert all(budget.count(c.embedding_text) < budget.max_tokens for c in chunks), "a chunk would be truncated"
        assert {c.section for c in chunks} == {"Overview", *doc.sections}
        assert all(c.allowed_actions == doc.allowed_actions and c.risk_type == doc.risk_type for c in chunks)
    assert len(ids) == len(set(ids))
    assert "POL-ATO#thresholds-1" in ids and "POL-ATO#thresholds-2" in ids  # ~450 tokens: split in two
    assert "POL-ATO#actions-1" in ids and "POL-ATO#actions-2" not in ids


def test_a_long_section_splits_at_item_boundaries_into_even_parts(documents):
    doc = next(d for d in documents if d.risk_type == "account_takeover")
    small = TokenBudget(TokenBudget.of_artifact(ARTIFACT_DIR).count, max_tokens=120)
    parts = [c for c in chunk_policy(doc, small) if c.section == "Thresholds"]
    assert len(parts) >= 4 and [p.part for p in parts] == list(range(1, len(parts) + 1))
    assert all(p.text.startswith(("- **ATO-", "Account takeover thresholds")) for p in parts)
    assert "\n\n".join(p.text for p in parts).count("**ATO-") == 8


# -- the library on both backends -------------------------------------------------------------------------------


def test_search_finds_the_takeover_policy_first(library):
    hits = library.search("failed logins then password reset then payout", top_k=5)
    assert hits[0].policy_id == "POL-ATO" and hits[0].risk_type == "account_takeover"
    assert hits == sorted(hits, key=lambda h: -h.similarity) and -1 <= hits[-1].similarity <= hits[0].similarity <= 1
    promo = library.search("a batch of new accounts on one device redeem the welcome promo", top_k=3)
    assert promo[0].risk_type == "promo_abuse"


def test_risk_type_filter(library):
    query = "failed logins then password reset then payout"
    hits = library.search(query, top_k=6, risk_types=["collusion", "brushing"])
    assert len(hits) == 6 and {h.risk_type for h in hits} <= {"collusion", "brushing"}
    assert library.search("payout", top_k=3, risk_types=[]) == []
    with pytest.raises(TypeError):
        library.search("payout", top_k=3, risk_types="collusion")


def test_passages_carry_the_chunk_payload(library, documents):
    hit = library.search("BLOCK only when the required evidence holds", top_k=1, risk_types=["account_takeover"])[0]
    assert hit.chunk_id.startswith("POL-ATO#") and hit.title == documents[0].title
    assert hit.version == "2026-11-01" and hit.allowed_actions == ("APPROVE", "REVIEW", "BLOCK")
    assert hit.rule_ids and all(f"**{rule}**" in hit.text for rule in hit.rule_ids)


def test_chunks_with_rules_find_where_a_cited_rule_is_defined(library):
    found = library.chunks_with_rules(["ATO-3", "BRUSH-8", "ATO-1", "NOPE-1"])
    assert [c.chunk_id for c in found] == ["POL-ATO#thresholds-1", "POL-BRUSH#required-evidence-1"]
    assert all("**ATO-3**" in c.text or "**BRUSH-8**" in c.text for c in found)
    assert library.chunks_with_rules(["NOPE-1"]) == [] and library.chunks_with_rules([]) == []


def test_documents_and_allowed_actions_come_back_from_the_index(library, documents):
    stored = library.documents()
    assert set(stored) == set(RISK_TYPES)
    for doc in documents:
        again = stored[doc.risk_type]
        assert again.policy_id == doc.policy_id and again.allowed_actions == doc.allowed_actions
        assert [(r.rule_id, r.section) for r in again.rules] == [(r.rule_id, r.section) for r in doc.rules]
        assert list(again.sections) == list(doc.sections)
    assert library.allowed_actions() == {d.risk_type: d.allowed_actions for d in documents}


@pytest.mark.parametrize("backend", BACKENDS)
def test_reingest_is_idempotent_and_a_changed_document_loses_stale_chunks(backend, tmp_path, embedder):
    folder = tmp_path / "policies"
    shutil.copytree(POLICY_DIR, folder)
    settings = settings_for(backend, tmp_path, folder)
    first = build_policy_index(settings, progress=False, embedder=embedder)
    again = build_policy_index(settings, progress=False, embedder=embedder)
    assert (first.new, first.total) == (first.added, first.added)
    assert (again.added, again.new, again.total) == (first.added, 0, first.total)

    # drop the look-alikes section of the takeover policy and shorten its Thresholds to one part
    path = folder / "account_takeover.md"
    text = path.read_text()
    start, end = text.index("## Legitimate look-alikes"), text.index("## Actions")
    text = text[:start] + text[end:]
    text = text[: text.index("- **ATO-5**")] + text[text.index("## Required evidence"):]
    path.write_text(text)
    changed = build_policy_index(settings, progress=False, embedder=embedder)
    with open_policy_library(settings, read_only=True, embedder=embedder) as library:
        ato = [c.chunk_id for c in library.chunks() if c.policy_id == "POL-ATO"]
        expected = [c.chunk_id for c in chunk_policy(load_policy_documents(folder)[0], library.budget)]
        assert ato == expected
        assert "POL-ATO#legitimate-look-alikes-1" not in ato and "POL-ATO#thresholds-2" not in ato
        assert changed.total == library.count() == first.total - 2
        assert library.search("owner back from a trip on a new phone", 10, ["account_takeover"])
    # a policy removed from the folder leaves the index too
    (folder / "brushing.md").unlink()
    pruned = build_policy_index(settings, progress=False, embedder=embedder)
    with open_policy_library(settings, read_only=True, embedder=embedder) as library:
        assert "brushing" not in library.allowed_actions() and pruned.total == library.count()


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_only_library_needs_an_index(backend, tmp_path, embedder, documents):
    settings = settings_for(backend, tmp_path)
    with pytest.raises(PolicyIndexNotFoundError, match="`index` command"):
        open_policy_library(settings, read_only=True, embedder=embedder)
    with open_policy_library(settings, embedder=embedder) as library:
        library.add_documents(documents[:1])
    with open_policy_library(settings, read_only=True, embedder=embedder) as library:
        with pytest.raises(RuntimeError, match="read-only"):
            library.add_documents(documents)


@pytest.mark.parametrize("backend", BACKENDS)
def test_policies_live_beside_the_case_memory(backend, tmp_path, embedder, documents):
    settings = settings_for(backend, tmp_path)
    encoder = BehaviourEncoder(["a"], [0.0], [1.0])
    with open_case_memory(settings, encoder, embedder=embedder) as memory, \
            open_policy_library(settings, embedder=embedder) as library:
        library.add_documents(documents)
        assert memory.count() == 0 and library.count() > 0
    if backend == "edge":
        assert sorted(p.name for p in (tmp_path / "edge").iterdir()) == ["cases_test", "policies_test"]
        with open_policy_library(settings, read_only=True, embedder=embedder) as library:
            schema = library.vector_store.client.info().payload_schema
            assert {"chunk_id", "policy_id", "risk_type", "section", "rule_ids", "doc_id"} <= set(schema)


def test_backends_return_the_same_passages(tmp_path, embedder, documents):
    queries = ["failed logins then password reset then payout", "terse five-star reviews", "shared card in a ring",
               "many clicks in very short sessions", "what evidence does a BLOCK need"]
    with open_policy_library(settings_for("edge", tmp_path), embedder=embedder) as edge, \
            open_policy_library(settings_for("qdrant", tmp_path), embedder=embedder) as local:
        edge.add_documents(documents)
        local.add_documents(documents)
        for query in queries:
            for risk_types in (None, ["collusion", "click_farm"]):
                a, b = edge.search(query, 6, risk_types), local.search(query, 6, risk_types)
                assert [p.chunk_id for p in a] == [p.chunk_id for p in b]
                assert [p.similarity for p in a] == pytest.approx([p.similarity for p in b], abs=1e-5)


def test_policy_digest_follows_the_files(tmp_path):
    folder = tmp_path / "p"
    shutil.copytree(POLICY_DIR, folder)
    before = policy_dir_digest(folder)
    assert policy_dir_digest(folder) == before == policy_dir_digest(POLICY_DIR)
    (folder / "README.md").write_text("changed readme")  # not a policy
    assert policy_dir_digest(folder) == before
    (folder / "collusion.md").write_text((folder / "collusion.md").read_text() + "\n")
    assert policy_dir_digest(folder) != before


@pytest.mark.qdrant_server
def test_policy_library_on_a_real_qdrant_server(tmp_path, embedder, documents):
    url = os.environ.get("QDRANT_URL")
    if not url:
        pytest.skip("set QDRANT_URL to run against a real Qdrant server")
    settings = RetrievalSettings(
        backend="qdrant",
        qdrant_url=url,
        qdrant_api_key=os.environ.get("QDRANT_API_KEY"),
        policy_collection=f"riskcascade_policies_{uuid.uuid4().hex[:12]}",
        embedding_dir=ARTIFACT_DIR,
    )
    server = open_policy_library(settings, embedder=embedder)
    try:
        server.add_documents(documents)
        server.add_documents(documents)
        with open_policy_library(settings_for("edge", tmp_path), embedder=embedder) as edge:
            edge.add_documents(documents)
            assert server.count() == edge.count()
            for risk_types in (None, ["account_takeover"]):
                a = server.search("failed logins then password reset then payout", 5, risk_types)
                b = edge.search("failed logins then password reset then payout", 5, risk_types)
                assert [p.chunk_id for p in a] == [p.chunk_id for p in b]
        schema = server.vector_store.client.get_collection(settings.policy_collection).payload_schema
        assert {"policy_id", "risk_type", "section", "rule_ids", "doc_id"} <= set(schema)
    finally:
        server.vector_store.client.delete_collection(settings.policy_collection)
        server.close()

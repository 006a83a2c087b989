"""The policy knowledge base (retrieval/policies/*.md) is well-formed for chunking, retrieval and citation.

Each document is parsed the way the reasoner's pipeline sees it (``retrieval.policy_documents``, what the policy
library indexes): YAML front matter, then ``##`` sections that are chunked on their own. The checks tie the prose to
the code, so that renaming a feature, adding a risk type or reusing a rule id breaks this test instead of silently
leaving the reasoner with stale policy text.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
from collections import Counter
from pathlib import Path

import pytest

from retrieval.policy_library import ACTIONS_BY_SEVERITY, PolicyDocument, parse_policy
from riskcascade.core.domain import RISK_TYPES, Entities
from riskcascade.modelling.synthetic import FEATURE_NAMES

POLICY_DIR = Path(__file__).resolve().parent.parent / "retrieval" / "policies"
FRONT_MATTER_KEYS = {"policy_id", "risk_type", "version", "title", "allowed_actions"}
REQUIRED_SECTIONS = ("Signals", "Thresholds", "Required evidence", "Legitimate look-alikes", "Actions")
MIN_WORDS, MAX_WORDS = 400, 800
KNOWN_IDENTIFIERS = frozenset(FEATURE_NAMES) | {f.name for f in dataclasses.fields(Entities)}

BACKTICKED = re.compile(r"`([^`\n]+)`")
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
FEATURE_LIKE = re.compile(r"^[a-z][a-z0-9_]*$")
BOLD_RULE_ID = re.compile(r"\*\*([A-Z]+-\d+)\*\*")
RULE_REFERENCE = re.compile(r"\b([A-Z]+-\d+)\b")
ACTION_WORD = re.compile(r"\b(APPROVE|REVIEW|BLOCK)\b")

POLICY_PATHS = sorted(p for p in POLICY_DIR.glob("*.md") if p.name != "README.md")
DOCUMENTS = [parse_policy(p) for p in POLICY_PATHS]


def by_name(doc: PolicyDocument) -> str:
    return doc.path.name


def test_one_document_per_risk_type() -> None:
    risk_types = Counter(doc.front.get("risk_type") for doc in DOCUMENTS)
    assert set(risk_types) == set(RISK_TYPES), f"risk types covered: {sorted(map(str, risk_types))}"
    assert all(n == 1 for n in risk_types.values()), f"risk types with more than one document: {risk_types}"
    for doc in DOCUMENTS:
        assert doc.path.name == f"{doc.front['risk_type']}.md"


@pytest.mark.parametrize("doc", DOCUMENTS, ids=by_name)
def test_front_matter_is_complete_and_valid(doc: PolicyDocument) -> None:
    front = doc.front
    assert set(front) == FRONT_MATTER_KEYS, f"keys: {sorted(front)}"
    assert doc.short, f"policy_id {front['policy_id']!r} is not POL-<SHORT> in capital letters"
    assert front["risk_type"] in RISK_TYPES
    version = front["version"]
    if isinstance(version, str):
        version = datetime.date.fromisoformat(version)
    assert isinstance(version, datetime.date), f"version {front['version']!r} is not a YYYY-MM-DD date"
    assert isinstance(front["title"], str) and front["title"].strip()
    actions = front["allowed_actions"]
    assert isinstance(actions, list) and actions, "allowed_actions must be a non-empty list"
    assert set(actions) <= set(ACTIONS_BY_SEVERITY), f"unknown actions: {set(actions) - set(ACTIONS_BY_SEVERITY)}"
    assert len(set(actions)) == len(actions), "allowed_actions lists an action twice"
    assert actions == sorted(actions, key=ACTIONS_BY_SEVERITY.index), "allowed_actions not in order of severity"


def test_policy_ids_are_unique() -> None:
    ids = Counter(doc.front["policy_id"] for doc in DOCUMENTS)
    assert [i for i, n in ids.items() if n > 1] == []


@pytest.mark.parametrize("doc", DOCUMENTS, ids=by_name)
def test_required_sections_stand_alone(doc: PolicyDocument) -> None:
    missing = [s for s in REQUIRED_SECTIONS if s not in doc.sections]
    assert missing == [], f"missing sections: {missing}"
    risk_words = doc.front["risk_type"].replace("_", " ")
    for name in REQUIRED_SECTIONS:
        first_paragraph = doc.sections[name].strip().split("\n\n")[0]
        assert risk_words in first_paragraph.lower(), (
            f"'## {name}' must name '{risk_words}' in its first paragraph so a chunk retrieved alone is clear"
        )


@pytest.mark.parametrize("doc", DOCUMENTS, ids=by_name)
def test_backticked_identifiers_are_platform_features(doc: PolicyDocument) -> None:
    named = {
        token
        for span in BACKTICKED.findall(doc.body)
        for token in IDENTIFIER.findall(span)
        if FEATURE_LIKE.match(token)
    }
    unknown = sorted(named - KNOWN_IDENTIFIERS)
    assert unknown == [], f"not a feature in FEATURE_NAMES nor an Entities field: {unknown}"
    features_in_signals = {
        token for span in BACKTICKED.findall(doc.sections["Signals"]) for token in IDENTIFIER.findall(span)
    } & set(FEATURE_NAMES)
    assert len(features_in_signals) >= 5, f"Signals names too few platform features: {sorted(features_in_signals)}"


def test_rule_ids_are_unique_and_prefixed() -> None:
    seen: dict[str, str] = {}
    for doc in DOCUMENTS:
        for rule in doc.rules:
            assert rule.rule_id.split("-")[0] == doc.short, (
                f"{doc.path.name}: {rule.rule_id} does not use the prefix {doc.short} of {doc.front['policy_id']}"
            )
            where = seen.get(rule.rule_id)
            assert where is None, f"{rule.rule_id} is defined in both {where} and {doc.path.name}"
            seen[rule.rule_id] = doc.path.name
    assert len(seen) >= 5 * len(DOCUMENTS)


@pytest.mark.parametrize("doc", DOCUMENTS, ids=by_name)
def test_rule_ids_start_rule_lines_and_references_resolve(doc: PolicyDocument) -> None:
    defined = {rule.rule_id for rule in doc.rules}
    bold = BOLD_RULE_ID.findall(doc.body)
    assert sorted(bold) == sorted(defined), "a bold rule id must start a list item, once"
    all_defined = {rule.rule_id for other in DOCUMENTS for rule in other.rules}
    dangling = sorted(set(RULE_REFERENCE.findall(doc.body)) - all_defined)
    assert dangling == [], f"references to rules that do not exist: {dangling}"
    for section in ("Thresholds", "Required evidence", "Actions"):
        assert any(rule.section == section for rule in doc.rules), f"'## {section}' has no rule with an id"


@pytest.mark.parametrize("doc", DOCUMENTS, ids=by_name)
def test_actions_are_allowed_and_thresholds_name_theirs(doc: PolicyDocument) -> None:
    allowed = set(doc.front["allowed_actions"])
    used = set(ACTION_WORD.findall(doc.body))
    assert used <= allowed, f"the text recommends actions the policy does not allow: {sorted(used - allowed)}"
    for rule in doc.rules:
        if rule.section == "Thresholds":
            assert ACTION_WORD.search(rule.text), f"{rule.rule_id} does not say which action it supports"


@pytest.mark.parametrize("doc", DOCUMENTS, ids=by_name)
def test_block_rests_on_required_evidence(doc: PolicyDocument) -> None:
    if "BLOCK" not in doc.front["allowed_actions"]:
        pytest.skip("this policy never blocks")
    evidence_ids = {rule.rule_id for rule in doc.rules if rule.section == "Required evidence"}
    block_rules = [rule for rule in doc.rules if rule.section == "Actions" and "BLOCK only" in rule.text]
    assert block_rules, "'## Actions' needs a 'BLOCK only ...' rule"
    for rule in block_rules:
        cited = set(RULE_REFERENCE.findall(rule.text.removeprefix(f"- **{rule.rule_id}**")))
        assert cited & evidence_ids, f"{rule.rule_id} allows BLOCK without citing a Required evidence rule"


@pytest.mark.parametrize("doc", DOCUMENTS, ids=by_name)
def test_length_suits_retrieval(doc: PolicyDocument) -> None:
    words = len(doc.body.split())
    assert MIN_WORDS <= words <= MAX_WORDS, f"{words} words; keep a policy between {MIN_WORDS} and {MAX_WORDS}"

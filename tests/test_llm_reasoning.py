"""The whole case review workflow on the real small LLM, for both LLM backends (llama_cpp in process, and
openai_compatible against llama-cpp-python's own server): every step runs, the answer is schema-valid or falls
back to REVIEW with its reason, and an injection planted in the event's note does not change the verdict.

SmolLM2-135M is a weak judge (FIELD-NOTES): these tests check the machinery and the guarantees, not its wisdom.
"""

from __future__ import annotations

import pytest

from retrieval.case_memory import BehaviourEncoder, open_case_memory
from retrieval.policy_documents import load_policy_documents
from retrieval.policy_library import open_policy_library
from riskcascade.config import LLMSettings, RetrievalSettings
from riskcascade.domain import Action
from riskcascade.synthetic import FEATURE_NAMES, to_adjudicated_case
from tests.test_llm_backends import _openai_llm, gguf, llama_llm, llama_server, settings  # noqa: F401 (fixtures)
from tests.test_reasoning_workflow import INJECTION, busy_event, data, request_for, review, workflow_with  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.llm]

BUDGET_MS = 60_000  # no deadline pressure: these tests are about answers, not latency
SMALL_MODEL_PROMPT = {"max_prompt_evidence": 12, "max_prompt_chars": 240}  # fits SmolLM2's context, ~1k tokens


@pytest.fixture(scope="module")
def edge_knowledge(tmp_path_factory, data):  # noqa: F811
    import numpy as np

    train, _ = data
    retrieval = RetrievalSettings(backend="edge", edge_path=tmp_path_factory.mktemp("llm-knowledge") / "edge")
    x = np.array([[e.features[n] for n in FEATURE_NAMES] for e in train])
    memory = open_case_memory(retrieval, BehaviourEncoder(FEATURE_NAMES, x.mean(axis=0), x.std(axis=0)))
    memory.add_cases([to_adjudicated_case(e) for e in train], batch_size=512)
    library = open_policy_library(retrieval, embedder=memory.embedder)
    library.add_documents(load_policy_documents(retrieval.policy_dir))
    yield retrieval, memory, library
    library.close()
    memory.close()


@pytest.fixture(params=["llama_cpp", "openai_compatible"])
def backend(request, settings: LLMSettings):  # noqa: F811
    if request.param == "llama_cpp":
        return request.param, request.getfixturevalue("llama_llm"), settings.model_copy(update=SMALL_MODEL_PROMPT)
    url = request.getfixturevalue("llama_server")
    llm = _openai_llm(settings, url)
    update = {"backend": "openai_compatible", "base_url": url, **SMALL_MODEL_PROMPT}
    return request.param, llm, settings.model_copy(update=update)


def test_small_llm_reviews_a_case_through_every_step(edge_knowledge, data, backend):  # noqa: F811
    name, llm, llm_settings = backend
    train, test = data
    verdict = review(workflow_with(edge_knowledge, llm, name, llm_settings),
                     request_for(busy_event(train, test), budget_ms=BUDGET_MS))
    assert [s.name for s in verdict.steps] == ["plan", "structured_data", "similar_cases", "policy_search",
                                                "reasoning", "reflection"]
    assert verdict.backend == name
    reasoning = verdict.steps[4].outcome
    fallback = [r for r in verdict.reasons if r.code == "REASONER_FALLBACK"]
    # The grammar holds the model to the schema, so the real model's answer is accepted, not a fallback.
    assert not fallback, reasoning
    assert reasoning.startswith(f"{name}: ") and "citations" in reasoning and verdict.rationale
    assert verdict.action in (Action.APPROVE, Action.REVIEW, Action.BLOCK) and 0.0 <= verdict.score <= 1.0
    assert verdict.evidence  # the verdict carries the retrieved evidence, cited items first


def test_injection_does_not_change_the_small_llms_verdict(edge_knowledge, data, backend):  # noqa: F811
    name, llm, llm_settings = backend
    train, test = data
    e = busy_event(train, test)
    workflow = workflow_with(edge_knowledge, llm, name, llm_settings)
    plain = review(workflow, request_for(e, budget_ms=BUDGET_MS))
    planted = review(workflow, request_for(e, note=f"{e.note} {INJECTION}", budget_ms=BUDGET_MS))
    assert planted.action == plain.action, (plain.rationale, planted.rationale)
    assert planted.action is not Action.APPROVE  # what the injection asks for, on a fraud case

"""Reasoning LLM backends, chosen by ``LLMSettings.backend``; each is a LlamaIndex ``LLM`` (see base.py)."""

from __future__ import annotations

from llama_index.core.llms import LLM

from riskcascade.core.config import LLMSettings, ReasonerSettings


def make_llm(settings: LLMSettings, reasoner: ReasonerSettings) -> LLM:
    """The configured backend. The local and remote ones are imported only when chosen (llama_cpp is an extra)."""
    if settings.backend == "evidence":
        from services.reasoning.llm.evidence_backend import EvidenceWeightedLLM

        return EvidenceWeightedLLM(settings=reasoner)
    if settings.backend == "llama_cpp":
        from services.reasoning.llm.llama_cpp_backend import LlamaCppJsonLLM

        return LlamaCppJsonLLM.from_settings(settings)
    if settings.backend == "openai_compatible":
        from services.reasoning.llm.openai_compatible import OpenAICompatibleLLM

        return OpenAICompatibleLLM.from_settings(settings)
    raise ValueError(f"unknown llm.backend {settings.backend!r}")

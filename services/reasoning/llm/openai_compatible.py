"""The ``openai_compatible`` backend: any OpenAI-compatible chat endpoint (vLLM, Ollama, Ray Serve LLM,
llama-cpp-python's server), through LlamaIndex's own ``OpenAILike`` integration.

``OpenAILike`` already speaks the protocol; this subclass adds the call-time contract of base.py:

- ``json_schema`` goes into ``response_format``. Servers disagree on its shape: OpenAI, vLLM, Ray Serve LLM and
  Ollama take ``{"type": "json_schema", "json_schema": {"name", "schema"}}``; llama-cpp-python's server only
  takes ``{"type": "json_object", "schema": ...}`` (``json_schema`` fails its request validation, answered as HTTP
  500), and vLLM ignores a schema inside ``json_object``; so the shape is a setting (``schema_format``).
- ``max_tokens`` overrides the default cap per call (``OpenAI._get_model_kwargs`` would let the instance's
  ``max_tokens`` win over the call's, hence the override below).
- ``timeout_s`` becomes the request's own timeout, and ``openai.APITimeoutError`` becomes ``TimeoutError``.
- retries are off: the caller holds a deadline, and a retry after a failure would spend it blindly.
- the API's ``finish_reason`` is reported in ``additional_kwargs["finish_reason"]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import openai
from llama_index.core.base.llms.types import ChatMessage, ChatResponse, CompletionResponse, MessageRole
from llama_index.core.bridge.pydantic import Field
from llama_index.llms.openai_like import OpenAILike

from riskcascade.core.config import LLMSettings
from services.reasoning.llm.base import FINISH_REASON, LENGTH, STOP

SchemaFormat = Literal["json_schema", "json_object"]
DEFAULT_SCHEMA_FORMAT: SchemaFormat = "json_schema"  # the OpenAI structured-outputs shape, the common one
SCHEMA_NAME = "reasoning_answer"  # json_schema requires a name; servers only echo it


class OpenAICompatibleLLM(OpenAILike):
    """``OpenAILike`` that honours base.py's ``json_schema`` / ``max_tokens`` / ``timeout_s`` per call."""

    schema_format: SchemaFormat = Field(
        default=DEFAULT_SCHEMA_FORMAT,
        description="json_schema = OpenAI structured outputs (vLLM, Ollama, Ray Serve LLM); "
        "json_object = {type: json_object, schema} (llama-cpp-python's server)",
    )

    @classmethod
    def from_settings(cls, settings: LLMSettings) -> OpenAICompatibleLLM:
        return cls(
            model=settings.model,
            api_base=settings.base_url,
            api_key=settings.api_key_text(),
            temperature=settings.temperature,
            max_tokens=settings.max_output_tokens,
            context_window=settings.context_tokens,
            timeout=settings.timeout_s,
            max_retries=0,
            is_chat_model=True,
            # LLMSettings does not carry this knob yet; until it does, every server gets the OpenAI shape.
            schema_format=settings.schema_format,
        )

    @classmethod
    def class_name(cls) -> str:
        return "OpenAICompatibleLLM"

    def chat(
        self,
        messages: Sequence[ChatMessage],
        json_schema: dict[str, Any] | None = None,
        max_tokens: int | None = None,
        timeout_s: float | None = None,
        **kwargs: Any,
    ) -> ChatResponse:
        """One chat completion; see base.py for the keywords. Other keywords go to the request as they are."""
        request = self._request(json_schema, max_tokens, timeout_s, kwargs)
        try:
            response = super().chat(messages, **request)
        except openai.APITimeoutError as exc:
            raise self._timeout(request) from exc
        response.additional_kwargs[FINISH_REASON] = _finish_reason(response.raw)
        return response

    async def achat(
        self,
        messages: Sequence[ChatMessage],
        json_schema: dict[str, Any] | None = None,
        max_tokens: int | None = None,
        timeout_s: float | None = None,
        **kwargs: Any,
    ) -> ChatResponse:
        """``chat`` for async callers (a Ray Serve replica's event loop), with the same contract."""
        request = self._request(json_schema, max_tokens, timeout_s, kwargs)
        try:
            response = await super().achat(messages, **request)
        except openai.APITimeoutError as exc:
            raise self._timeout(request) from exc
        response.additional_kwargs[FINISH_REASON] = _finish_reason(response.raw)
        return response

    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """``prompt`` as one user message through ``chat`` (the endpoint is a chat one; the server templates it)."""
        answer = self.chat([ChatMessage(role=MessageRole.USER, content=prompt)], **kwargs)
        return CompletionResponse(
            text=answer.message.content or "", raw=answer.raw, additional_kwargs=answer.additional_kwargs
        )

    def _get_model_kwargs(self, **kwargs: Any) -> dict[str, Any]:
        """The request body; a call's ``max_tokens`` wins over the instance default (the parent does the reverse)."""
        request = super()._get_model_kwargs(**kwargs)
        if "max_tokens" in kwargs:
            request["max_tokens"] = kwargs["max_tokens"]
        return request

    def _request(
        self, json_schema: dict[str, Any] | None, max_tokens: int | None, timeout_s: float | None, kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        """base.py's keywords as the openai client's ``create`` arguments."""
        request = dict(kwargs)
        if json_schema is not None:
            request["response_format"] = self._response_format(json_schema)
        if max_tokens is not None:
            request["max_tokens"] = max_tokens
        if timeout_s is not None:
            request["timeout"] = timeout_s  # a request option of the openai client, not a body field
        return request

    def _timeout(self, request: dict[str, Any]) -> TimeoutError:
        return TimeoutError(f"{self.api_base} gave no answer within {request.get('timeout', self.timeout):.2f} s")

    def _response_format(self, schema: dict[str, Any]) -> dict[str, Any]:
        if self.schema_format == "json_object":
            return {"type": "json_object", "schema": schema}
        return {"type": "json_schema", "json_schema": {"name": SCHEMA_NAME, "schema": schema}}


def _finish_reason(raw: Any) -> str:
    """The API's reason as base.py names it: ``length`` is a cut answer; an absent reason means it ended."""
    choices = getattr(raw, "choices", None) or []
    reason = getattr(choices[0], "finish_reason", None) if choices else None
    if reason in (None, STOP):
        return STOP
    return LENGTH if reason == LENGTH else str(reason)

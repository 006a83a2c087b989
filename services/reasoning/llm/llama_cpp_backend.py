"""The ``llama_cpp`` backend: a local GGUF model in this process, through llama-cpp-python's ``Llama`` directly.

Not LlamaIndex's ``llama-index-llms-llama-cpp``: it downloads Llama-2 when no model path is given and ignores
call-time keyword arguments, and this backend's contract (base.py) is all call-time arguments.

How each part of the contract is met:

- ``json_schema``: a GBNF grammar built from the schema (``LlamaGrammar.from_json_schema``) constrains every sampled
  token, so the answer can only be JSON of that shape. A schema the converter cannot handle raises (no silent
  fallback to free JSON).
- the prompt is rendered with the model's own chat template (``tokenizer.chat_template`` in the GGUF metadata).
  ``create_chat_completion`` would do that too, but it takes no stopping criteria, and the deadline needs one, so
  the template is applied here and the tokens go to ``create_completion``.
- ``timeout_s``: a stopping criterion checks the deadline after every sampled token and ends generation there, the
  answer is then reported with ``finish_reason="timeout"``. The prompt evaluation (prefill) is one native call that
  cannot be interrupted; an answer that overruns because of it is caught by ``ask_for_json``.
- one llama context is not thread-safe, so calls are serialised by a lock; waiting for it counts against the
  call's deadline, and a call that never gets it raises ``TimeoutError``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms import CustomLLM
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback

from riskcascade.config import LLMSettings
from services.reasoning.llm.base import FINISH_REASON, LENGTH, STOP, TIMEOUT
from services.reasoning.llm.local_model import smollm2_gguf_path

CHAT_TEMPLATE_KEY = "tokenizer.chat_template"  # GGUF metadata key of the model's own chat template
CALL_ARGUMENTS = frozenset({"json_schema", "max_tokens", "timeout_s"})
# llama-cpp-python's server applies this penalty by default, its in-process API none (1.0). Without it SmolLM2
# fills a bounded string with "1.1.1.1..." up to maxLength (156 answer tokens instead of 68 on the test case); with
# it both backends give the same answer on the same model. LLMSettings does not carry it yet (see from_settings).
DEFAULT_REPEAT_PENALTY = 1.1


def _import_llama_cpp() -> Any:
    """Import llama_cpp only when a model is loaded, so that this module imports without the `llm` extra.

    OpenMP threads that spin while waiting for work starve every other process on a small shared machine, so
    they are told to sleep; this must happen before the native library loads. Measured on 2 cores with SmolLM2:
    sleeping threads cost an idle machine ~3x in answer speed (43 against 140 tokens/s) but win under load
    (55-72 against 20-30 tokens/s beside two busy processes), and the platform runs loaded. ``setdefault``
    leaves an operator's explicit choice alone (OMP_WAIT_POLICY=ACTIVE for a machine of its own).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import llama_cpp

    return llama_cpp


class _Deadline:
    """llama-cpp-python stopping criterion: stop at the deadline, and remember that this is why it stopped."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.passed = False

    def __call__(self, tokens: Any, logits: Any) -> bool:
        self.passed = self.passed or time.monotonic() >= self.deadline
        return self.passed


class LlamaCppJsonLLM(CustomLLM):
    """A LlamaIndex LLM over one local GGUF model that answers in JSON constrained to a per-call schema."""

    model_path: Path = Field(description="GGUF file of the model")
    context_tokens: int = Field(description="llama.cpp context window, prompt and answer together")
    threads: int = Field(description="CPU threads for prompt evaluation and generation")
    temperature: float = Field(description="sampling temperature (0 = greedy)")
    max_output_tokens: int = Field(description="answer length cap when a call gives none")
    timeout_s: float = Field(description="longest a call may take when it gives no timeout_s")
    repeat_penalty: float = Field(DEFAULT_REPEAT_PENALTY, description="penalty on tokens already generated")

    _llama: Any = PrivateAttr()
    _formatter: Any = PrivateAttr()
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def __init__(self, **data: Any) -> None:
        super().__init__(**data)
        llama_cpp = _import_llama_cpp()
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self._llama = llama_cpp.Llama(
            model_path=str(self.model_path),
            n_ctx=self.context_tokens,
            n_threads=self.threads,
            n_threads_batch=self.threads,  # its default is every core, which oversubscribes a shared machine
            verbose=False,
        )
        template = self._llama.metadata.get(CHAT_TEMPLATE_KEY)
        if not template:
            raise ValueError(f"{self.model_path} has no chat template ({CHAT_TEMPLATE_KEY}) in its GGUF metadata")
        eos_id, bos_id = self._llama.token_eos(), self._llama.token_bos()
        self._formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=self._token_text(eos_id),
            bos_token=self._token_text(bos_id),
            stop_token_ids=[eos_id],
        )

    @classmethod
    def from_settings(cls, settings: LLMSettings) -> LlamaCppJsonLLM:
        """The model of ``settings.model_path``, or SmolLM2-135M-Instruct from the `llm` extra when it is empty."""
        return cls(
            model_path=settings.model_path or smollm2_gguf_path(),
            context_tokens=settings.context_tokens,
            threads=settings.threads,
            temperature=settings.temperature,
            max_output_tokens=settings.max_output_tokens,
            timeout_s=settings.timeout_s,
            repeat_penalty=settings.repeat_penalty,
        )

    @classmethod
    def class_name(cls) -> str:
        return "LlamaCppJsonLLM"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self.context_tokens,
            num_output=self.max_output_tokens,
            is_chat_model=True,
            model_name=self.model_path.name,
        )

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """One answer to ``messages`` rendered with the model's chat template; see base.py for the keywords."""
        rendered = self._formatter(messages=[{"role": m.role.value, "content": m.content or ""} for m in messages])
        tokens = self._llama.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)
        text, extra = self._generate(tokens, rendered.stop, rendered.stopping_criteria, **kwargs)
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), additional_kwargs=extra)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """``prompt`` as one user message, or as the model's raw input when ``formatted`` (already templated)."""
        if not formatted:
            answer = self.chat([ChatMessage(role=MessageRole.USER, content=prompt)], **kwargs)
            return CompletionResponse(text=answer.message.content or "", additional_kwargs=answer.additional_kwargs)
        tokens = self._llama.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        text, extra = self._generate(tokens, None, None, **kwargs)
        return CompletionResponse(text=text, additional_kwargs=extra)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        """The whole answer as one chunk: the reasoning step needs the complete JSON object, never a prefix."""
        answer = self.complete(prompt, formatted=formatted, **kwargs)

        def one_chunk() -> CompletionResponseGen:
            yield CompletionResponse(text=answer.text, delta=answer.text, additional_kwargs=answer.additional_kwargs)

        return one_chunk()

    def _generate(
        self, tokens: list[int], stop: Any, stop_criteria: Any, **kwargs: Any
    ) -> tuple[str, dict[str, Any]]:
        """Generate under the lock and the deadline; the text and the additional_kwargs of the response."""
        unknown = set(kwargs) - CALL_ARGUMENTS
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword arguments {sorted(unknown)}")
        timeout_s = float(self.timeout_s if kwargs.get("timeout_s") is None else kwargs["timeout_s"])
        max_tokens = int(self.max_output_tokens if kwargs.get("max_tokens") is None else kwargs["max_tokens"])
        schema = kwargs.get("json_schema")
        deadline = _Deadline(time.monotonic() + timeout_s)

        from llama_cpp import LlamaGrammar, StoppingCriteriaList

        grammar = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False) if schema else None
        criteria = StoppingCriteriaList([deadline, *(stop_criteria or [])])
        if not self._lock.acquire(timeout=timeout_s):
            raise TimeoutError(f"the local model stayed busy with other calls for {timeout_s:.2f} s")
        try:
            result = self._llama.create_completion(
                prompt=tokens,
                max_tokens=max_tokens,
                temperature=self.temperature,
                repeat_penalty=self.repeat_penalty,
                stop=stop,
                stopping_criteria=criteria,
                grammar=grammar,
            )
        finally:
            self._lock.release()
        choice = result["choices"][0]
        reason = TIMEOUT if deadline.passed else LENGTH if choice["finish_reason"] == LENGTH else STOP
        return choice["text"], {FINISH_REASON: reason, **result.get("usage", {})}

    def _token_text(self, token_id: int) -> str:
        """A special token's text (the chat template may print it), or empty when the model has none."""
        if token_id < 0:
            return ""
        return self._llama.detokenize([token_id], special=True).decode("utf-8", errors="replace")

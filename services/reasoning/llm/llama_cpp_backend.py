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
- ``timeout_s``: a call returns by its deadline, whatever the model is doing. Generation runs in the model's one
  worker thread; the caller waits for it until the deadline and then raises ``TimeoutError``. The generation
  itself stops there too: during the prompt evaluation (prefill: native ``llama_decode`` calls that no stopping
  criterion reaches, 37 s for one 0.05 s call on a loaded machine) llama.cpp's abort callback
  (``llama_set_abort_callback``) checks the deadline between graph nodes and aborts the decode; from the first
  sampled token on, a stopping criterion checks it after every token (and the abort callback is switched off:
  it takes the GIL once per graph node, ~10 % of generation time). An answer cut there is reported with
  ``finish_reason="timeout"``.
- one llama context is not thread-safe, and an abandoned generation must not pile up behind a new one: the model
  runs one generation at a time, held from a call's start until that generation has really ended (aborted at
  its deadline at the latest). A call that finds the model busy waits for it only until its own deadline, then
  raises ``TimeoutError`` (the caller's fallback); it never queues past it.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
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

from riskcascade.core.config import LLMSettings
from services.reasoning.llm.base import FINISH_REASON, LENGTH, STOP, TIMEOUT, bounded_wait
from services.reasoning.llm.local_model import smollm2_gguf_path

CHAT_TEMPLATE_KEY = "tokenizer.chat_template"  # GGUF metadata key of the model's own chat template
CALL_ARGUMENTS = frozenset({"json_schema", "max_tokens", "timeout_s"})


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
    """One generation's deadline: the abort check during prefill, then a stopping criterion after every sampled
    token; it remembers that the deadline is why generation stopped."""

    def __init__(self, deadline: float, on_first_token: Callable[[], None]) -> None:
        self.deadline = deadline
        self.passed = False
        self._on_first_token: Callable[[], None] | None = on_first_token

    def expired(self) -> bool:
        self.passed = self.passed or time.monotonic() >= self.deadline
        return self.passed

    def __call__(self, tokens: Any, logits: Any) -> bool:
        if self._on_first_token is not None:  # the prompt is evaluated: from now on one token at a time
            self._on_first_token()
            self._on_first_token = None
        return self.expired()


class LlamaCppJsonLLM(CustomLLM):
    """A LlamaIndex LLM over one local GGUF model that answers in JSON constrained to a per-call schema."""

    model_path: Path = Field(description="GGUF file of the model")
    context_tokens: int = Field(description="llama.cpp context window, prompt and answer together")
    threads: int = Field(description="CPU threads for prompt evaluation and generation")
    temperature: float = Field(description="sampling temperature (0 = greedy)")
    max_output_tokens: int = Field(description="answer length cap when a call gives none")
    timeout_s: float = Field(description="longest a call may take when it gives no timeout_s")
    # llama-cpp-python's server applies a penalty by default, its in-process API none (1.0). Without one SmolLM2
    # fills a bounded string with "1.1.1.1..." up to maxLength (156 answer tokens instead of 68 on the test case);
    # with LLMSettings.repeat_penalty both backends give the same answer on the same model.
    repeat_penalty: float = Field(description="penalty on tokens already generated")

    _llama: Any = PrivateAttr()
    _formatter: Any = PrivateAttr()
    # Held from a call's start until its generation has ended: one generation at a time, none queued behind it.
    _busy: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _worker: ThreadPoolExecutor = PrivateAttr()
    _running: _Deadline | None = PrivateAttr(default=None)  # the generation the abort callback watches
    _abort_check: Any = PrivateAttr()  # the ctypes callback; kept here so it lives as long as the context
    _no_abort_check: Any = PrivateAttr()  # a NULL callback: llama.cpp then never asks
    _set_abort_check: Callable[[Any], None] = PrivateAttr()  # installs a callback (or none) on the context

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
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-cpp")
        self._abort_check = llama_cpp.ggml_abort_callback(self._abort_requested)
        self._no_abort_check = ctypes.cast(None, llama_cpp.ggml_abort_callback)
        context = self._llama.ctx
        self._set_abort_check = lambda check: llama_cpp.llama_set_abort_callback(context, check, None)

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
        return self._chat(messages, **kwargs)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """``chat`` waited for in a worker thread, so the awaiting event loop keeps running."""
        return await asyncio.to_thread(self._chat, messages, **kwargs)

    def _chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        rendered = self._formatter(messages=[{"role": m.role.value, "content": m.content or ""} for m in messages])
        tokens = self._llama.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)
        text, extra = self._generate(tokens, rendered.stop, rendered.stopping_criteria, **kwargs)
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), additional_kwargs=extra)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """``prompt`` as one user message, or as the model's raw input when ``formatted`` (already templated)."""
        return self._complete(prompt, formatted, **kwargs)

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """``complete`` waited for in a worker thread, so the awaiting event loop keeps running."""
        return await asyncio.to_thread(self._complete, prompt, formatted, **kwargs)

    def _complete(self, prompt: str, formatted: bool, **kwargs: Any) -> CompletionResponse:
        if not formatted:
            answer = self._chat([ChatMessage(role=MessageRole.USER, content=prompt)], **kwargs)
            return CompletionResponse(text=answer.message.content or "", additional_kwargs=answer.additional_kwargs)
        tokens = self._llama.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        text, extra = self._generate(tokens, None, None, **kwargs)
        return CompletionResponse(text=text, additional_kwargs=extra)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        """The whole answer as one chunk: the reasoning step needs the complete JSON object, never a prefix."""
        answer = self._complete(prompt, formatted, **kwargs)

        def one_chunk() -> CompletionResponseGen:
            yield CompletionResponse(text=answer.text, delta=answer.text, additional_kwargs=answer.additional_kwargs)

        return one_chunk()

    def _generate(
        self, tokens: list[int], stop: Any, stop_criteria: Any, **kwargs: Any
    ) -> tuple[str, dict[str, Any]]:
        """Generate in the model's worker thread, waited for until the deadline; the text and the
        additional_kwargs of the response. Raises ``TimeoutError`` at the deadline (the model busy, or no answer)."""
        unknown = set(kwargs) - CALL_ARGUMENTS
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword arguments {sorted(unknown)}")
        timeout_s = bounded_wait(float(self.timeout_s if kwargs.get("timeout_s") is None else kwargs["timeout_s"]))
        max_tokens = int(self.max_output_tokens if kwargs.get("max_tokens") is None else kwargs["max_tokens"])
        schema = kwargs.get("json_schema")
        deadline = _Deadline(time.monotonic() + timeout_s, on_first_token=self._stop_abort_checks)

        from llama_cpp import LlamaGrammar, StoppingCriteriaList

        grammar = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False) if schema else None
        request = dict(
            prompt=tokens,
            max_tokens=max_tokens,
            temperature=self.temperature,
            repeat_penalty=self.repeat_penalty,
            stop=stop,
            stopping_criteria=StoppingCriteriaList([deadline, *(stop_criteria or [])]),
            grammar=grammar,
        )
        if not self._busy.acquire(timeout=_left(deadline)):
            raise TimeoutError("the local model stayed busy with another call")
        try:
            generation = self._worker.submit(self._run, deadline, request)
        except BaseException:
            self._busy.release()
            raise
        try:
            result = generation.result(timeout=_left(deadline))
        except FutureTimeout:
            raise TimeoutError("generation stopped at the deadline") from None
        if result is None:
            raise TimeoutError("prompt evaluation aborted at the deadline")
        choice = result["choices"][0]
        reason = TIMEOUT if deadline.passed else LENGTH if choice["finish_reason"] == LENGTH else STOP
        return choice["text"], {FINISH_REASON: reason, **result.get("usage", {})}

    def _run(self, deadline: _Deadline, request: dict[str, Any]) -> dict[str, Any] | None:
        """One generation, in the worker thread, holding the model (released here, when it has really ended).
        None when the deadline aborted the prompt evaluation."""
        try:
            self._running = deadline
            self._set_abort_check(self._abort_check)
            return self._llama.create_completion(**request)
        except RuntimeError:
            if deadline.passed:  # llama_decode returned "aborted": the abort check saw the deadline
                return None
            raise
        finally:
            self._stop_abort_checks()
            self._running = None
            self._busy.release()

    def _abort_requested(self, _data: Any) -> bool:
        """llama.cpp's abort callback, asked between graph nodes of a decode: abort when the deadline passed."""
        running = self._running
        return running is not None and running.expired()

    def _stop_abort_checks(self) -> None:
        self._set_abort_check(self._no_abort_check)

    def _token_text(self, token_id: int) -> str:
        """A special token's text (the chat template may print it), or empty when the model has none."""
        if token_id < 0:
            return ""
        return self._llama.detokenize([token_id], special=True).decode("utf-8", errors="replace")


def _left(deadline: _Deadline) -> float:
    return bounded_wait(deadline.deadline - time.monotonic())

"""What every reasoning LLM backend honours, whichever LlamaIndex ``LLM`` it is.

The reasoning step asks for one JSON object that matches a bounded JSON schema (services/reasoning/schema.py)
through LlamaIndex's chat interface, with three keyword arguments every backend understands:

- ``json_schema``: the schema of this request; backends constrain decoding to it (a grammar for llama.cpp,
  ``response_format`` for an OpenAI-compatible endpoint). The evidence backend fills it by construction.
- ``max_tokens``: the answer length cap. An answer cut at the cap is reported with ``finish_reason="length"``:
  the model was looping.
- ``timeout_s``: the longest the call may take. A backend that runs out raises ``TimeoutError`` (or stops and
  reports ``finish_reason="timeout"``).

The backend reports why it stopped in ``ChatResponse.additional_kwargs["finish_reason"]`` (``"stop"``,
``"length"`` or ``"timeout"``). ``ask_for_json`` turns every way a call can fail into a ``ModelAnswer`` so the
reasoning step can fall back to REVIEW with the reason recorded, never raise to the caller.
``ask_for_json_off_loop`` is the same call for an event loop: it runs in a given bounded thread pool and is waited
for no longer than its timeout, so a backend that overruns (or a pool with no thread free) costs the loop nothing
and the caller no more than ``timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from typing import Any

from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.llms import LLM

FINISH_REASON = "finish_reason"
STOP, LENGTH, TIMEOUT, ERROR = "stop", "length", "timeout", "error"


@dataclass(frozen=True)
class ModelAnswer:
    text: str  # what the model produced (may be partial or empty)
    finish_reason: str  # stop | length | timeout | error
    seconds: float
    backend: str
    error: str = ""  # why the call failed, for the decision record

    @property
    def complete(self) -> bool:
        return self.finish_reason == STOP


def ask_for_json(
    llm: LLM,
    messages: Sequence[ChatMessage],
    schema: dict[str, Any],
    max_tokens: int,
    timeout_s: float,
    backend: str,
) -> ModelAnswer:
    """One structured call; never raises for a failing model (a programming error still raises TypeError)."""
    started = time.perf_counter()
    try:
        response = llm.chat(list(messages), json_schema=schema, max_tokens=max_tokens, timeout_s=timeout_s)
    except TimeoutError as exc:
        return ModelAnswer("", TIMEOUT, time.perf_counter() - started, backend, f"no answer within {timeout_s:.2f} s ({exc})")
    except TypeError:
        raise
    except Exception as exc:  # noqa: BLE001 - any backend failure becomes a recorded fallback, by design
        return ModelAnswer("", ERROR, time.perf_counter() - started, backend, f"{type(exc).__name__}: {exc}")
    seconds = time.perf_counter() - started
    reason = str(response.additional_kwargs.get(FINISH_REASON) or STOP)
    text = response.message.content or ""
    if reason == STOP and seconds > timeout_s:
        reason = TIMEOUT  # a backend that cannot be interrupted still answered too late
    return ModelAnswer(text, reason, seconds, backend)


def bounded_wait(timeout_s: float) -> float:
    """``timeout_s`` as a thread wait accepts it: waits longer than ``threading.TIMEOUT_MAX`` raise OverflowError."""
    return min(max(timeout_s, 0.0), threading.TIMEOUT_MAX)


async def ask_for_json_off_loop(
    executor: Executor,
    llm: LLM,
    messages: Sequence[ChatMessage],
    schema: dict[str, Any],
    max_tokens: int,
    timeout_s: float,
    backend: str,
) -> ModelAnswer:
    """``ask_for_json`` in a thread of ``executor``, awaited for at most ``timeout_s``; never raises for a failing,
    late or stuck model. A call still queued at the timeout is cancelled; one still running is left to the
    backend's own timeout (its result is dropped)."""
    started = time.perf_counter()
    call = partial(ask_for_json, llm, messages, schema, max_tokens, timeout_s, backend)
    context = contextvars.copy_context()  # the caller's trace context, as asyncio.to_thread would carry it
    pending = asyncio.get_running_loop().run_in_executor(executor, context.run, call)
    try:
        return await asyncio.wait_for(pending, timeout=bounded_wait(timeout_s))
    except asyncio.TimeoutError:
        seconds = time.perf_counter() - started
        return ModelAnswer("", TIMEOUT, seconds, backend, f"no answer within {timeout_s:.2f} s (stopped waiting)")

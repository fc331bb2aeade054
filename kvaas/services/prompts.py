"""The prompt policy: what request text the engine accepts, and how it becomes token ids.

One rule set for every route that runs or sizes a prompt (cache create, extend and attach, the
OpenAI-compatible completions, the cost estimate):

- an engine must be running (``503 engine_unavailable`` otherwise), and a ``model`` named in a
  request must be the one it serves;
- a prompt is exactly one of ``prompt`` (text), ``messages`` (chat, through the model's chat
  template) or ``token_ids`` (each in ``[0, vocabulary size)``);
- it is not empty, and text is not only whitespace (a ``prompt``, or the contents of all the
  ``messages``): ``400`` before anything is tokenized;
- it fits the model: a cached prefix holds at most ``max_model_len - 1`` tokens (one is left to
  generate), and a generation's prompt plus ``max_tokens`` at most ``max_model_len``.

Text is measured before it is tokenized: a prompt (or the messages' contents together) longer
than :data:`MAX_CHARS_PER_TOKEN` characters per token of the model's context cannot fit, and is
refused at once (``400``) instead of being tokenized. Tokenizing and chat templating of more
than :data:`INLINE_TOKENIZE_CHARS` characters run in a worker thread, off the event loop, so one
tenant's long prompt never stalls another's requests; shorter text is tokenized on the loop,
where it costs less than the hop to a thread and back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kvaas.engine import Engine
from kvaas.errors import APIError, BadRequest, EngineUnavailable

#: The most characters one token of any supported tokenizer spans (long runs of spaces or
#: symbols are single tokens); text longer than this times ``max_model_len`` cannot fit.
MAX_CHARS_PER_TOKEN = 32

#: Text up to this many characters is tokenized on the event loop: about 0.27 ms with the tiny
#: model's tokenizer on a 2-core AMD EPYC (0.26 us per character), the cost of a thread hop on
#: a busy machine; longer text goes to a worker thread.
INLINE_TOKENIZE_CHARS = 1000

#: Bytes one character can take in a JSON body (``\\uXXXX``, as ``ensure_ascii`` encoders write).
JSON_BYTES_PER_CHAR = 6

#: Room in a prompt-carrying body for everything besides the prompt (ids, sampling, metadata).
PROMPT_BODY_OVERHEAD = 64 * 1024


def prompt_body_limit(max_model_len: int) -> int:
    """The largest request body that can carry a prompt the engine accepts: a prompt of
    ``max_model_len`` tokens at :data:`MAX_CHARS_PER_TOKEN` characters each, every character
    JSON-escaped, plus :data:`PROMPT_BODY_OVERHEAD`. Token ids (at most 8 bytes each with their
    comma) and chat messages (each at least one token of template) fit within it too, so a body
    above it holds a prompt that would be refused anyway, and can be refused unread."""
    return max_model_len * MAX_CHARS_PER_TOKEN * JSON_BYTES_PER_CHAR + PROMPT_BODY_OVERHEAD


@dataclass
class Prompt:
    """Request text in one of its three forms (exactly one is set)."""

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    token_ids: list[int] | None = None

    @property
    def given(self) -> bool:
        """Whether any of the three forms is set."""
        return any(x is not None for x in (self.prompt, self.messages, self.token_ids))


class PromptPolicy:
    """The policy above, bound to the engine this gateway runs (``None``: no engine)."""

    def __init__(self, engine: Engine | None) -> None:
        self._engine = engine

    @property
    def engine(self) -> Engine:
        """The running engine; ``503 engine_unavailable`` when the gateway has none."""
        if self._engine is None:
            raise EngineUnavailable("this gateway runs without an engine (KVAAS_ENGINE=none)")
        return self._engine

    def check_model(self, model: str | None, error: type[APIError] = BadRequest) -> None:
        """``model``, when given, is the served one; else ``error`` (the API answers 400, the
        OpenAI-compatible routes 404 as OpenAI does)."""
        served = self.engine.model.name
        if model is not None and model != served:
            raise error(
                f"model {model!r} is not served here; this service runs {served!r}", param="model"
            )

    async def tokenize(
        self,
        p: Prompt,
        *,
        continuation: bool,
        generation_prompt: bool | None = None,
        ids_param: str = "token_ids",
    ) -> list[int]:
        """Token ids of ``p``. ``continuation``: they follow earlier tokens (no BOS); chat
        messages then end with the assistant's turn unless ``generation_prompt`` says otherwise.
        ``ids_param``: the request field that carried token ids (named in errors)."""
        eng = self.engine
        given = [x for x in (p.prompt, p.messages, p.token_ids) if x is not None]
        if len(given) != 1:
            raise BadRequest("give exactly one of `prompt`, `messages` or `token_ids`")
        self._require_text(p)
        if p.token_ids is not None:
            vocab = len(eng.model.tokenizer)
            if any(t < 0 or t >= vocab for t in p.token_ids):
                raise BadRequest(f"token ids must lie in [0, {vocab})", param=ids_param)
            return list(p.token_ids)
        chars = (
            len(p.prompt)
            if p.prompt is not None
            else sum(len(str(v)) for m in p.messages or () for v in m.values())
        )
        limit = eng.max_model_len * MAX_CHARS_PER_TOKEN
        if chars > limit:
            raise BadRequest(
                f"the prompt has {chars} characters; this model's context of "
                f"{eng.max_model_len} tokens holds at most {limit}",
                param="messages" if p.messages is not None else "prompt",
            )
        if p.messages is not None:
            gen = continuation if generation_prompt is None else generation_prompt
            return await _off_loop_if_long(
                chars,
                eng.model.encode_messages,
                p.messages,
                add_generation_prompt=gen,
                continuation=continuation,
            )
        assert p.prompt is not None
        return await _off_loop_if_long(
            chars, eng.model.encode, p.prompt, add_special_tokens=not continuation
        )

    @staticmethod
    def _require_text(p: Prompt) -> None:
        """Text forms hold more than whitespace (chat messages: one content at least)."""
        if p.prompt is not None and not p.prompt.strip():
            raise BadRequest(
                "the prompt is empty or only whitespace: give some text", param="prompt"
            )
        if p.messages is not None and not any(
            str(m.get("content", "")).strip() for m in p.messages
        ):
            raise BadRequest(
                "the messages are empty or only whitespace: give a message with some text",
                param="messages",
            )

    @staticmethod
    def require_tokens(
        ids: Sequence[int], message: str = "the prompt is empty", param: str | None = None
    ) -> None:
        """A prompt (or extension) must hold at least one token."""
        if not ids:
            raise BadRequest(message, param=param)

    def check_cacheable(self, ids: Sequence[int], param: str = "prompt") -> None:
        """A cached prefix leaves one position of the model's context to generate."""
        limit = self.engine.max_model_len - 1
        if len(ids) > limit:
            raise BadRequest(
                f"the prompt has {len(ids)} tokens; this model caches at most {limit}",
                param=param,
            )

    def check_generation(self, prompt_tokens: int, max_tokens: int, what: str) -> None:
        """``prompt_tokens`` + ``max_tokens`` fit the model's context; ``what`` names the
        prompt's parts in the error (e.g. ``"prompt (12)"``)."""
        limit = self.engine.max_model_len
        if prompt_tokens + max_tokens > limit:
            raise BadRequest(
                f"{what} + max_tokens ({max_tokens}) tokens exceed the model's {limit}",
                param="max_tokens",
            )


async def _off_loop_if_long(
    chars: int, fn: Callable[..., list[int]], *args: Any, **kw: Any
) -> list[int]:
    """``fn(*args, **kw)``: on the loop for text of at most :data:`INLINE_TOKENIZE_CHARS`
    characters, in a worker thread for longer."""
    if chars <= INLINE_TOKENIZE_CHARS:
        return fn(*args, **kw)
    return await asyncio.to_thread(fn, *args, **kw)

"""The engine interface the gateway talks to, whatever runs the model.

An engine takes prompt token ids, sampling parameters and an optional
:class:`~kvaas.connector.params.TransferPlan` (what the KVaaS connector should save or load),
and returns the generated tokens with the counts the API reports. Two implementations:
:class:`~kvaas.engine.inprocess.InProcessEngine` (vLLM's ``AsyncLLM`` inside the gateway) and
:class:`~kvaas.engine.remote.RemoteEngine` (``vllm serve`` nodes over HTTP).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from kvaas.connector.params import TransferPlan
from kvaas.engine.model_info import ModelInfo


@dataclass(frozen=True, slots=True)
class Sampling:
    """Sampling parameters of one request (OpenAI semantics)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    #: isolates the engine's own prefix cache: requests share reused KV only with requests of
    #: the same salt (the gateway passes one per tenant)
    cache_salt: str | None = None


@dataclass(slots=True)
class Generation:
    """The outcome of one request (or, while streaming, its latest delta)."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    ttft_ms: float | None = None
    #: per generated token: {token id: logprob} of the top ``Sampling.logprobs`` candidates
    logprobs: list[dict[int, float]] | None = None
    #: what the connector reported (``kv_transfer_params["kvaas"]`` of the output)
    connector: dict[str, Any] = field(default_factory=dict)

    def absorb(self, delta: Generation) -> None:
        """Add a streamed delta to this running total."""
        self.token_ids.extend(delta.token_ids)
        self.text += delta.text
        if delta.logprobs:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        self.finish_reason = delta.finish_reason or self.finish_reason
        self.prompt_tokens = delta.prompt_tokens or self.prompt_tokens
        self.cached_tokens = max(self.cached_tokens, delta.cached_tokens)
        if self.ttft_ms is None:
            self.ttft_ms = delta.ttft_ms
        self.connector.update(delta.connector)


class EngineError(RuntimeError):
    """The engine failed a request or is not running. Its text may reach callers: it names
    no node, address or answer of the engine; ``detail`` holds those, for the log only."""

    def __init__(self, message: str, *, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail


class Degraded(str):
    """A health line of an engine that serves, with less capacity than configured (some
    remote nodes down or refused): readiness shows it and stays green."""


#: ``ok``: serving (perhaps degraded); ``recovering``: down, coming back without a restart of
#: the gateway (the in-process engine restarting, remote nodes all down or ejected);
#: ``down``: down for good, the gateway process must be restarted (``/healthz`` fails).
Liveness = Literal["ok", "recovering", "down"]


class Engine(ABC):
    """A running model. ``start`` before use, ``shutdown`` at the end."""

    model: ModelInfo

    def liveness(self) -> Liveness:
        """Whether the engine serves, recovers by itself, or needs the process restarted
        (what ``/healthz`` reports). The default: ``ok``."""
        return "ok"

    @property
    @abstractmethod
    def block_size(self) -> int: ...

    @property
    @abstractmethod
    def max_model_len(self) -> int: ...

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def shutdown(self) -> None: ...

    @abstractmethod
    async def health(self) -> str:
        """A short status line (a :class:`Degraded` one when capacity is reduced); raises
        :class:`EngineError` when the engine cannot serve."""

    @abstractmethod
    def stream(
        self, token_ids: Sequence[int], sampling: Sampling, plan: TransferPlan | None = None
    ) -> AsyncIterator[Generation]:
        """Yield deltas (new tokens and text) as they are generated; the last one carries the
        finish reason and the final counts."""

    async def generate(
        self, token_ids: Sequence[int], sampling: Sampling, plan: TransferPlan | None = None
    ) -> Generation:
        """Run the request to completion."""
        out = Generation()
        async for d in self.stream(token_ids, sampling, plan):
            out.absorb(d)
        return out

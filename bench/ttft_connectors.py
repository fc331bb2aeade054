"""Connectors for ``bench/ttft.py``: several stores and vLLM's ``ExampleConnector`` side by side
in one engine (vLLM's ``MultiConnector``), each answering only the requests routed to it.

A request names its connector in ``kv_transfer_params["bench_route"]``; each connector here is
given its route in ``kv_connector_extra_config["bench_route"]`` and ignores every other request,
so a request costs exactly one connector's lookup, load and save, as in a one-connector engine.
The KVaaS connector itself is used unchanged (only its plan parsing is filtered by route).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.example_connector import ExampleConnector

from kvaas.connector.connector import KVaaSConnector
from kvaas.connector.params import TransferPlan

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

ROUTE = "bench_route"


def _route(vllm_config: VllmConfig) -> str:
    transfer = vllm_config.kv_transfer_config
    extra = transfer.kv_connector_extra_config if transfer is not None else {}
    return str(extra.get(ROUTE, ""))


def _routed(request: Request, route: str) -> bool:
    params = request.kv_transfer_params or {}
    return bool(params.get(ROUTE) == route)


class RoutedKVaaSConnector(KVaaSConnector):
    """The KVaaS connector, answering only requests routed to it."""

    def __init__(self, vllm_config: VllmConfig, role: Any, kv_cache_config: Any) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self._bench_route = _route(vllm_config)

    def _plan(self, request: Request) -> TransferPlan | None:  # type: ignore[override]
        if not _routed(request, self._bench_route):
            return None
        return KVaaSConnector._plan(request)


class RoutedExampleConnector(ExampleConnector):
    """vLLM's ``ExampleConnector``, loading and storing only requests routed to it."""

    def __init__(self, vllm_config: VllmConfig, role: Any, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self._bench_route = _route(vllm_config)
        self._bench_ids: set[str] = set()

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        if not _routed(request, self._bench_route):
            return 0, False
        self._bench_ids.add(request.request_id)
        return super().get_num_new_matched_tokens(request, num_computed_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> Any:
        mine = [r for r in scheduler_output.scheduled_new_reqs if r.req_id in self._bench_ids]
        self._bench_ids.difference_update(r.req_id for r in mine)
        return super().build_connector_meta(
            dataclasses.replace(scheduler_output, scheduled_new_reqs=mine)
        )

"""A remote engine node: vLLM's OpenAI server, plus the model fingerprint the gateway checks.

``python -m kvaas.engine.node <vllm serve arguments>`` (what ``kvaas engine command`` prints)
computes the fingerprint of the model it serves (:func:`~kvaas.engine.model_info.
model_fingerprint` of ``--model`` with the KV dtype of ``--dtype``: file contents, not names)
before it starts, then runs vLLM's OpenAI server module with one more middleware that answers
``GET /kvaas/fingerprint`` with ``{"fingerprint": ..., "world": [tp, pp]}`` (its tensor- and
pipeline-parallel sizes). The gateway reads it before it routes anything to the node and on
every health probe: a node whose fingerprint differs from the gateway's (other weights, other
dtype), or whose world does not match the gateway's (its chunks are stored under other shard
keys), gets no requests, and readiness says why.

The route tells nothing secret (the fingerprint is a hash, also in every cache's metadata), so
it is outside vLLM's ``/v1`` routes, which ``VLLM_API_KEY`` protects.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

FINGERPRINT_PATH = "/kvaas/fingerprint"
FINGERPRINT_ENV = "KVAAS_NODE_FINGERPRINT"
WORLD_ENV = "KVAAS_NODE_WORLD"
SERVER_MODULE = "vllm.entrypoints.openai.api_server"


async def fingerprint_route(request: Any, call_next: Callable[[Any], Awaitable[Any]]) -> Any:
    """vLLM server middleware: ``GET /kvaas/fingerprint`` → the node's model fingerprint."""
    if request.url.path == FINGERPRINT_PATH and request.method == "GET":
        from fastapi.responses import JSONResponse

        return JSONResponse(
            {"fingerprint": os.environ.get(FINGERPRINT_ENV), "world": _world_from_env()}
        )
    return await call_next(request)


def _world_from_env() -> list[int]:
    raw = os.environ.get(WORLD_ENV, "1,1")
    return [int(x) for x in raw.split(",")]


def node_world(argv: list[str]) -> tuple[int, int]:
    """The tensor- and pipeline-parallel sizes the vLLM arguments ``argv`` run with."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    parser.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    args, _ = parser.parse_known_args(argv)
    return args.tensor_parallel_size, args.pipeline_parallel_size


def node_fingerprint(argv: list[str]) -> str:
    """The fingerprint of the model the vLLM arguments ``argv`` serve."""
    from kvaas.codec.sizing import kv_dtype
    from kvaas.engine.model_info import model_fingerprint

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="auto")
    args, _ = parser.parse_known_args(argv)
    model_dir = Path(args.model)
    return model_fingerprint(model_dir, kv_dtype(model_dir, args.dtype))


def main(argv: list[str] | None = None) -> None:
    """Start the node: fingerprint its model, then run vLLM's server with the route above."""
    args = list(sys.argv[1:] if argv is None else argv)
    os.environ[FINGERPRINT_ENV] = node_fingerprint(args)
    os.environ[WORLD_ENV] = ",".join(map(str, node_world(args)))
    sys.argv = [SERVER_MODULE, *args, "--middleware", "kvaas.engine.node.fingerprint_route"]
    runpy.run_module(SERVER_MODULE, run_name="__main__")


if __name__ == "__main__":
    main()

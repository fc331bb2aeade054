"""The vLLM side of KVaaS: the KV connector and the copies into and out of paged KV memory.

Importing this package does not import vLLM; :mod:`kvaas.connector.connector` does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from kvaas.connector.params import PARAMS_KEY, TransferPlan
from kvaas.store.factory import StoreConfig

CONNECTOR_NAME = "KVaaSConnector"
CONNECTOR_MODULE = "kvaas.connector.connector"
#: The environment variable a remote node's connector reads the store's Redis URL from.
REDIS_URL_ENV = "KVAAS_REDIS_URL"

__all__ = [
    "CONNECTOR_MODULE",
    "CONNECTOR_NAME",
    "PARAMS_KEY",
    "REDIS_URL_ENV",
    "TransferPlan",
    "store_config",
    "transfer_config",
]


def transfer_config(
    store: dict[str, Any],
    *,
    redis_url_env: str | None = None,
    presence_ttl_s: float | None = None,
    save_queue_bytes: int | None = None,
    decoded_bytes: int | None = None,
    layerwise_loads: bool | None = None,
    warm_on_save: bool | None = None,
) -> dict[str, Any]:
    """vLLM's ``kv_transfer_config`` (as a dict, also the JSON of ``vllm serve
    --kv-transfer-config``) that loads the KVaaS connector on the store ``store``
    (``StoreConfig.to_dict()``).

    With ``redis_url_env``, the store's Redis URL (which may hold a password) is left out: the
    connector reads it from that environment variable of the engine's process, so that it
    never appears on a command line. ``presence_ttl_s``: seconds the scheduler remembers a
    chunk it found stored (:mod:`kvaas.connector.presence`; ``None``: its default).
    ``save_queue_bytes``: the bound of the worker's background save queue
    (:mod:`kvaas.connector.saver`; 0: saves on the engine's step thread; ``None``: its
    default). ``decoded_bytes``: the byte budget of each worker's pre-decoded tier
    (:mod:`kvaas.connector.decoded`; 0: off; ``None``: its default). ``layerwise_loads``:
    whether a worker loads in the background, layer by layer (:mod:`kvaas.connector.layerwise`;
    ``None``: no). ``warm_on_save``:
    whether a worker keeps the chunks it saves in its own memory tier (``None``: yes)."""
    extra: dict[str, Any] = {"store": store}
    if redis_url_env is not None and store.get("redis_url"):
        extra = {"store": {**store, "redis_url": None}, "redis_url_env": redis_url_env}
    options = {
        "presence_ttl_s": presence_ttl_s,
        "save_queue_bytes": save_queue_bytes,
        "decoded_bytes": decoded_bytes,
        "layerwise_loads": layerwise_loads,
        "warm_on_save": warm_on_save,
    }
    extra.update({k: v for k, v in options.items() if v is not None})  # None: the default
    return {
        "kv_connector": CONNECTOR_NAME,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": extra,
    }


def byte_budget(extra: Mapping[str, Any] | None, key: str, env: str, default: int) -> int:
    """A connector's byte budget: ``extra[key]`` when present, else the environment variable
    ``env`` (blank counts as unset), else ``default``. ``ValueError`` on a value that is not
    an integer >= 0."""
    raw: Any = (extra or {}).get(key)
    if raw is None:
        raw = os.environ.get(env, "").strip() or default
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be an integer, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{key} must be >= 0, got {value}")
    return value


def store_config(extra: Mapping[str, Any] | None) -> StoreConfig:
    """The store of a ``kv_connector_extra_config`` made by :func:`transfer_config`, its Redis
    URL read from the environment variable it names, if any. ``ValueError`` (naming the
    variable, never a value) when the store is missing or the variable is unset."""
    if not extra or "store" not in extra:
        raise ValueError("KVaaSConnector needs kv_connector_extra_config['store']")
    store = dict(extra["store"])
    env = extra.get("redis_url_env")
    if env is not None:
        url = os.environ.get(str(env), "").strip()
        if not url:
            raise ValueError(
                f"KVaaSConnector reads the store's Redis URL from ${env}, which is not set"
            )
        store["redis_url"] = url
    return StoreConfig.from_dict(store)

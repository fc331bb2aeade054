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


def transfer_config(store: dict[str, Any], *, redis_url_env: str | None = None) -> dict[str, Any]:
    """vLLM's ``kv_transfer_config`` (as a dict, also the JSON of ``vllm serve
    --kv-transfer-config``) that loads the KVaaS connector on the store ``store``
    (``StoreConfig.to_dict()``).

    With ``redis_url_env``, the store's Redis URL (which may hold a password) is left out: the
    connector reads it from that environment variable of the engine's process, so that it
    never appears on a command line."""
    extra: dict[str, Any] = {"store": store}
    if redis_url_env is not None and store.get("redis_url"):
        extra = {"store": {**store, "redis_url": None}, "redis_url_env": redis_url_env}
    return {
        "kv_connector": CONNECTOR_NAME,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": extra,
    }


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

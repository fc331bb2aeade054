"""The vLLM side of KVaaS: the KV connector and the copies into and out of paged KV memory.

Importing this package does not import vLLM; :mod:`kvaas.connector.connector` does.
"""

from __future__ import annotations

from typing import Any

from kvaas.connector.params import PARAMS_KEY, TransferPlan

CONNECTOR_NAME = "KVaaSConnector"
CONNECTOR_MODULE = "kvaas.connector.connector"

__all__ = ["CONNECTOR_MODULE", "CONNECTOR_NAME", "PARAMS_KEY", "TransferPlan", "transfer_config"]


def transfer_config(store: dict[str, Any]) -> dict[str, Any]:
    """vLLM's ``kv_transfer_config`` (as a dict, also the JSON of ``vllm serve
    --kv-transfer-config``) that loads the KVaaS connector on the store ``store``
    (``StoreConfig.to_dict()``)."""
    return {
        "kv_connector": CONNECTOR_NAME,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"store": store},
    }

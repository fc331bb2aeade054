"""The per-step prefill cap (``KVAAS_ENGINE_PREFILL_CHUNK_TOKENS``) reaches vLLM's scheduler:
in the in-process engine's arguments and on the printed remote node command."""

from __future__ import annotations

import json
from pathlib import Path

from kvaas.config import Settings
from kvaas.engine import build_engine
from kvaas.engine.inprocess import InProcessEngine
from kvaas.engine.node_command import serve_command
from kvaas.engine.options import EngineOptions
from kvaas.store.factory import StoreConfig


def test_in_process_engine_passes_the_cap_to_the_scheduler(tmp_path: Path) -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=tmp_path,
        engine="inprocess",
        model="tiny",
        engine_prefill_chunk_tokens=96,
    )
    engine = build_engine(settings)
    assert isinstance(engine, InProcessEngine)
    args = engine._args()
    assert args.long_prefill_token_threshold == 96
    assert args.max_num_batched_tokens == settings.engine_max_batched_tokens


def test_node_command_carries_the_cap() -> None:
    store = StoreConfig(memory_bytes=1 << 20, disk_dir=None, disk_bytes=0, redis_url=None)
    chunked = EngineOptions(prefill_chunk_tokens=128)
    argv = serve_command("/models/tiny", "tiny", store.to_dict(), port=8100, options=chunked).argv
    i = argv.index("--long-prefill-token-threshold")
    assert argv[i + 1] == "128"
    default = serve_command("/models/tiny", "tiny", store.to_dict(), port=8100).argv
    assert default[default.index("--long-prefill-token-threshold") + 1] == "0"  # vLLM's own


def test_node_command_runs_the_fair_step_scheduler() -> None:
    store = StoreConfig(memory_bytes=1 << 20, disk_dir=None, disk_bytes=0, redis_url=None)
    argv = serve_command(
        "/models/tiny",
        "tiny",
        store.to_dict(),
        port=8100,
        options=EngineOptions(
            bulk_step_tokens=64, bulk_max_hold_s=0.25, bulk_step_ms=7.5, interactive_grace_ms=12.0
        ),
    ).argv
    assert argv[argv.index("--scheduling-policy") + 1] == "priority"
    assert argv[argv.index("--scheduler-cls") + 1] == "kvaas.engine.scheduler.fair_scheduler"
    extra = json.loads(argv[argv.index("--additional-config") + 1])
    assert extra == {
        "kvaas_scheduler": {
            "bulk_step_tokens": 64,
            "max_hold_s": 0.25,
            "bulk_step_ms": 7.5,
            "interactive_grace_ms": 12.0,
        }
    }


def test_in_process_engine_runs_the_fair_step_scheduler(tmp_path: Path) -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=tmp_path,
        engine="inprocess",
        model="tiny",
        engine_bulk_step_tokens=32,
        engine_bulk_step_ms=2.5,
        engine_interactive_grace_ms=40.0,
    )
    engine = build_engine(settings)
    assert isinstance(engine, InProcessEngine)
    args = engine._args()
    assert args.scheduling_policy == "priority"
    assert args.scheduler_cls == "kvaas.engine.scheduler.fair_scheduler"
    assert args.additional_config["kvaas_scheduler"]["bulk_step_tokens"] == 32
    assert args.additional_config["kvaas_scheduler"]["bulk_step_ms"] == 2.5
    assert args.additional_config["kvaas_scheduler"]["interactive_grace_ms"] == 40.0


def test_warming_on_save_reaches_the_connector(tmp_path: Path) -> None:
    store = StoreConfig(memory_bytes=1 << 20, disk_dir=None, disk_bytes=0, redis_url=None)
    cold = EngineOptions(warm_on_save=False)
    argv = serve_command("/models/tiny", "tiny", store.to_dict(), port=8100, options=cold).argv
    extra = json.loads(argv[argv.index("--kv-transfer-config") + 1])["kv_connector_extra_config"]
    assert extra["warm_on_save"] is False
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=tmp_path,
        engine="inprocess",
        model="tiny",
        connector_warm_on_save=False,
    )
    engine = build_engine(settings)
    assert isinstance(engine, InProcessEngine)
    assert engine._args().kv_transfer_config.kv_connector_extra_config["warm_on_save"] is False

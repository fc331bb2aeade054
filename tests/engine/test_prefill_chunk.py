"""The per-step prefill cap (``KVAAS_ENGINE_PREFILL_CHUNK_TOKENS``) reaches vLLM's scheduler:
in the in-process engine's arguments and on the printed remote node command."""

from __future__ import annotations

from pathlib import Path

from kvaas.config import Settings
from kvaas.engine import build_engine
from kvaas.engine.inprocess import InProcessEngine
from kvaas.engine.remote import serve_command
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
    argv = serve_command(
        "/models/tiny", "tiny", store.to_dict(), port=8100, prefill_chunk_tokens=128
    ).argv
    i = argv.index("--long-prefill-token-threshold")
    assert argv[i + 1] == "128"
    default = serve_command("/models/tiny", "tiny", store.to_dict(), port=8100).argv
    assert default[default.index("--long-prefill-token-threshold") + 1] == "0"  # vLLM's own

"""``kvaas engine command``: engine helpers."""

from __future__ import annotations

from typing import Annotated

import typer

from kvaas.cli.root import app, load_settings

engine_app = typer.Typer(help="Engine helpers.", no_args_is_help=True)
app.add_typer(engine_app, name="engine")


@engine_app.command("command")
def engine_command(
    port: Annotated[int, typer.Option(help="Port the node listens on.")] = 8100,
    device: Annotated[
        str, typer.Option(help="The node's device: `cpu` or `gpu` (eager mode, memory flags).")
    ] = "cpu",
) -> None:
    """Print the command that starts a remote engine node (`vllm serve`).

    One shell line, `KVAAS_REDIS_URL=... VLLM_API_KEY=... python -m kvaas.engine.node ...`:
    the secrets go in the node's environment, not its command line; the KV cache size
    (KVAAS_ENGINE_KV_CACHE_GIB) is on it, so the node starts as printed on a shared machine.
    Run it where `python` has kvaas and vLLM installed."""
    from kvaas.engine import kv_dtype
    from kvaas.engine.node_command import serve_command
    from kvaas.model_presets import resolve_model
    from kvaas.store.factory import StoreConfig

    if device not in ("cpu", "gpu"):
        raise typer.BadParameter("--device must be cpu or gpu")
    s = load_settings()
    model_dir = resolve_model(s.model, s.data_dir)
    cmd = serve_command(
        str(model_dir.resolve()),
        s.model if "/" not in s.model else model_dir.name,
        StoreConfig.from_settings(s).to_dict(),
        port=port,
        api_key=s.engine_api_key.get_secret_value() if s.engine_api_key else None,
        dtype=kv_dtype(model_dir, s.engine_dtype),
        max_model_len=s.engine_max_model_len,
        max_num_batched_tokens=s.engine_max_batched_tokens,
        prefill_chunk_tokens=s.engine_prefill_chunk_tokens,
        bulk_step_tokens=s.engine_bulk_step_tokens,
        bulk_max_hold_s=s.engine_bulk_max_hold_seconds,
        ipc_spin_s=s.engine_ipc_spin_seconds,
        presence_ttl_s=s.connector_presence_ttl_seconds,
        save_queue_bytes=s.connector_save_queue_bytes,
        decoded_bytes=s.connector_decoded_bytes,
        layerwise_loads=s.connector_layerwise_loads,
        warm_on_save=s.connector_warm_on_save,
        prefix_caching=s.engine_prefix_caching,
        kv_cache_gib=s.engine_kv_cache_gib,
        tensor_parallel_size=s.engine_tensor_parallel_size,
        pipeline_parallel_size=s.engine_pipeline_parallel_size,
        device="gpu" if device == "gpu" else "cpu",
        eager_mode=s.engine_eager,
        gpu_memory_fraction=s.engine_gpu_memory_fraction,
    )
    typer.echo(cmd.shell())

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
    from kvaas.engine import EngineOptions, kv_dtype
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
        options=EngineOptions.from_settings(s, kv_dtype(model_dir, s.engine_dtype)),
        device="gpu" if device == "gpu" else "cpu",
    )
    typer.echo(cmd.shell())

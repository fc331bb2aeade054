"""``kvaas models``: build and list the built-in model presets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kvaas.cli.root import app, err, fail, out
from kvaas.model_presets.builder import build_model, get_preset
from kvaas.model_presets.presets import PRESETS

models_app = typer.Typer(help="Build and list built-in models.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("list")
def list_presets() -> None:
    """List the presets."""
    table = Table(
        "preset", "arch", "layers", "hidden", "heads / kv", "head_dim", "trained", "description"
    )
    for p in PRESETS.values():
        table.add_row(
            p.name,
            p.architecture,
            str(p.num_layers),
            str(p.hidden_size),
            f"{p.num_heads} / {p.num_kv_heads}",
            str(p.head_dim),
            "yes" if p.train else "no (random)",
            p.description,
        )
    out.print(table)


@models_app.command("build")
def build(
    preset: Annotated[str, typer.Argument(help="Preset name (see `kvaas models list`).")],
    out: Annotated[Path | None, typer.Option(help="Output directory.")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if OUT holds a build.")] = False,
    retrain: Annotated[
        bool, typer.Option(help="Train from scratch instead of copying the shipped artifact.")
    ] = False,
    layers: Annotated[
        int | None, typer.Option(min=1, help="Override the layer count (shape presets).")
    ] = None,
) -> None:
    """Build PRESET into a Hugging Face model directory (deterministic)."""
    try:
        p = get_preset(preset)
    except ValueError as e:
        raise fail(str(e), 2) from e
    target = out or Path(".kvaas") / "models" / p.dir_name
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    ) as bar:
        task = bar.add_task(f"building {preset}", total=1.0)

        def report(msg: str, frac: float) -> None:
            bar.update(task, description=msg, completed=frac)

        path = build_model(
            preset, target, retrain=retrain, force=force or retrain, layers=layers, progress=report
        )
    print(path)

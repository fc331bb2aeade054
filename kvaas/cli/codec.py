"""``kvaas codec``: measure compression schemes on a real model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from kvaas.cli.root import app, err, fail, out

codec_app = typer.Typer(help="KV codec tools.", no_args_is_help=True)
app.add_typer(codec_app, name="codec")


@codec_app.command("eval")
def eval_cmd(
    scheme: Annotated[
        list[str] | None, typer.Option(help="Scheme(s) to evaluate (repeatable); default all.")
    ] = None,
    model: Annotated[str, typer.Option(help="Preset name or checkpoint directory.")] = "tiny",
    prefix_tokens: Annotated[int, typer.Option(min=16)] = 768,
    continuation_tokens: Annotated[int, typer.Option(min=2)] = 128,
    texts: Annotated[int, typer.Option(min=1, help="Held-out texts to average over.")] = 4,
    data_dir: Annotated[Path, typer.Option(help="Where presets are built.")] = Path(".kvaas"),
    json_path: Annotated[Path | None, typer.Option("--json", help="Write results here.")] = None,
) -> None:
    """Round-trip a model's KV through each scheme and compare continuations (KL, top-1)."""
    from kvaas.codec import SCHEMES
    from kvaas.codec.quality import LoadedModel, evaluate_scheme
    from kvaas.model_presets import resolve_model

    names = scheme or list(SCHEMES)
    unknown = [n for n in names if n not in SCHEMES]
    if unknown:
        raise fail(f"unknown scheme(s) {unknown}; known: {list(SCHEMES)}", 2)
    try:
        model_dir = resolve_model(model, data_dir)
    except ValueError as e:
        raise fail(str(e), 2) from e
    lm = LoadedModel(model_dir)
    table = Table(
        "scheme",
        "ratio vs bf16",
        "KL mean",
        "KL p99",
        "top-1",
        "Δ log-ppl",
        "passkey (orig → dec)",
        title=f"KV codec quality on {model}",
    )
    rows = []
    for name in names:
        err.print(f"evaluating {name} …")
        r = evaluate_scheme(
            lm,
            name,
            prefix_tokens=prefix_tokens,
            continuation_tokens=continuation_tokens,
            texts=texts,
        )
        rows.append(r.as_dict())
        table.add_row(
            name,
            f"{r.ratio_vs_bf16:.2f}x",
            f"{r.kl_mean:.5f}",
            f"{r.kl_p99:.4f}",
            f"{r.top1_agreement:.2%}",
            f"{r.delta_log_ppl:+.4f}",
            f"{r.passkey_original} → {r.passkey_decoded}",
        )
    out.print(table)
    if json_path:
        json_path.write_text(json.dumps(rows, indent=2) + "\n")

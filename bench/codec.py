"""Codec benchmark: compression ratio, single-core encode/decode throughput and quality.

Throughput is in GB/s of bf16-equivalent input (elements x 2 bytes) on one core
(``torch.set_num_threads(1)``), median of repeated runs, on a 256-token chunk of a
Qwen2.5-0.5B-shaped KV (24 layers, 2 KV heads, head_dim 64, bf16) built from the tiny model's
real KV statistics. Quality (KL, top-1) comes from :mod:`kvaas.codec.quality` on the trained
``tiny`` model.

    python bench/codec.py [--quick] [--json PATH] [--markdown JSON]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from kvaas import codec
from kvaas.codec.quality import LoadedModel, evaluate_scheme
from kvaas.model_presets import resolve_model


def _time(fn, reps: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def shaped_chunk(lm: LoadedModel, layers: int = 24, tokens: int = 256) -> torch.Tensor:
    """A 0.5B-shaped chunk: the tiny model's real per-layer KV tiled to ``layers`` layers.

    Each tiled copy is scaled per channel by a seeded factor near 1, so no layer repeats
    another bit for bit (a lossless coder would otherwise find the copies and report a ratio
    that real KV never gives).
    """
    text = "\n".join(Path(torch.__file__).read_text().splitlines()[:400])
    ids = torch.tensor(lm.tokenizer(text).input_ids[:tokens])
    kv, _ = lm.prefill(ids)
    reps = -(-layers // kv.shape[0])
    tiled = kv.repeat(reps, 1, 1, 1, 1)[:layers].float()
    gen = torch.Generator().manual_seed(0)
    scale = 1 + 0.05 * torch.randn(layers, 2, 1, 1, tiled.shape[-1], generator=gen)
    return (tiled * scale).to(torch.bfloat16).contiguous()


TIMES = "\u00d7"  # for the markdown table


def markdown(rows: list[dict[str, Any]]) -> str:
    """The docs table of a ``--json`` file."""
    out = [
        "| scheme | compression vs bf16 | encode GB/s | decode GB/s | KL mean | KL p99 | top-1 "
        "| Δ log-ppl | passkey (orig → decoded) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        out.append(
            f"| `{r['scheme']}` | {r['ratio_vs_bf16']:.2f}{TIMES} | {r['encode_gbps']:.2f} "
            f"| {r['decode_gbps']:.2f} | {r['kl_mean']:.5f} | {r['kl_p99']:.4f} "
            f"| {r['top1_agreement']:.2%} | {r['delta_log_ppl']:+.4f} "
            f"| {r['passkey_original']} → {r['passkey_decoded']} |"
        )
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller run (< 40 s)")
    ap.add_argument("--json", type=Path, help="write the result rows here")
    ap.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "kvaas-bench")
    ap.add_argument("--markdown", type=Path, help="print the docs table of a --json file")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0

    lm = LoadedModel(resolve_model("tiny", args.data_dir))
    torch.set_num_threads(1)
    chunk = shaped_chunk(lm)
    bf16_bytes = chunk.numel() * 2
    reps = 3 if args.quick else 10
    rows = []
    for name in codec.SCHEMES:
        blob = codec.encode(chunk, name)
        enc = _time(lambda n=name: codec.encode(chunk, n), reps)
        dec = _time(lambda b=blob: codec.decode(b), reps)
        torch.set_num_threads(2)
        q = evaluate_scheme(
            lm,
            name,
            prefix_tokens=512 if args.quick else 768,
            continuation_tokens=64 if args.quick else 128,
            texts=1 if args.quick else 4,
            passkey=not args.quick,
        )
        torch.set_num_threads(1)
        rows.append(
            {
                "scheme": name,
                "ratio_vs_bf16": round(bf16_bytes / len(blob), 4),
                "encode_gbps": round(bf16_bytes / enc / 1e9, 4),
                "decode_gbps": round(bf16_bytes / dec / 1e9, 4),
                "kl_mean": q.kl_mean,
                "kl_p99": q.kl_p99,
                "top1_agreement": q.top1_agreement,
                "delta_log_ppl": q.delta_log_ppl,
                "passkey_original": q.passkey_original,
                "passkey_decoded": q.passkey_decoded,
                "chunk_shape": list(chunk.shape),
                "quick": args.quick,
            }
        )
    table = Table(title="KV codec (0.5B-shaped 256-token bf16 chunk; quality on tiny)")
    for col in (
        "scheme",
        "ratio vs bf16",
        "encode GB/s",
        "decode GB/s",
        "KL mean",
        "KL p99",
        "top-1",
        "Δ log-ppl",
    ):
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        table.add_row(
            r["scheme"],
            f"{r['ratio_vs_bf16']:.2f}x",
            f"{r['encode_gbps']:.2f}",
            f"{r['decode_gbps']:.2f}",
            f"{r['kl_mean']:.5f}",
            f"{r['kl_p99']:.4f}",
            f"{r['top1_agreement']:.2%}",
            f"{r['delta_log_ppl']:+.4f}",
        )
    Console().print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Micro-benchmark of the connector's load path outside the engine: decoding a request's stored
chunks and writing them into vLLM's paged KV, on one core.

Two paths over the same blobs, into the same paged tensors (vLLM's CPU backend layout, block
size 128, the engine's dtype float32):

- ``cat+scatter``: ``codec.decode`` of every chunk (checksum verified again), ``torch.cat`` of
  all chunks, then one per-token indexed write per layer (the connector's former path);
- ``paged``: :class:`kvaas.connector.attach.PagedLoader` (decode into a reused staging buffer,
  one ``index_copy_`` of whole kernel blocks per layer for keys and for values).

Both must write the same bytes (checked). Reported: median CPU ms of the (single) thread per
attach (and the new path's
decode and copy stages), the ratio, and decode throughput in GB/s of bf16-equivalent KV. The
store (fetch, AES-GCM) is not part of it: ``bench/ttft.py`` reports those stages in the engine.

    python bench/attach_load.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kvaas import codec
from kvaas.connector.attach import PagedLoader
from kvaas.connector.chunks import ChunkShape, decode_fitting
from kvaas.connector.paged import PagedLayout, scatter, slots
from kvaas.connector.timings import StageClock

CHUNK, BLOCK = 256, 128
#: (name, layers, kv heads, head dim): the tiny model and the 0.5B shape
SHAPES = [("tiny", 4, 2, 64), ("qwen2.5-0.5b-shape", 24, 2, 64)]


def _rig(layers: int, heads: int, dim: int, tokens: int, scheme: str) -> dict[str, Any]:
    torch.manual_seed(0)
    n_blocks = 2 * tokens // BLOCK + 4
    paged = [torch.zeros(n_blocks, heads, BLOCK, 2 * dim) for _ in range(layers)]
    layout = PagedLayout.for_backend("CPU_ATTN", paged[0], BLOCK, heads, dim)
    kv = torch.randn(layers, 2, tokens, heads, dim)
    blobs = [
        codec.encode(kv[:, :, i : i + CHUNK].contiguous(), scheme) for i in range(0, tokens, CHUNK)
    ]
    blocks = list(range(n_blocks - 1, n_blocks - 1 - tokens // BLOCK, -1))  # scattered
    return {"paged": paged, "layout": layout, "blobs": blobs, "blocks": blocks}


def _old(r: dict[str, Any], views: list[tuple[torch.Tensor, torch.Tensor]], tokens: int) -> None:
    shape = ChunkShape(len(views), CHUNK, r["layout"].kv_heads, r["layout"].head_dim, torch.float32)
    chunks, refused = decode_fitting(r["blobs"], shape)
    assert refused is None
    kv = torch.cat(chunks, dim=2)
    blk, off = slots(r["blocks"], 0, tokens, r["layout"])
    for i, v in enumerate(views):
        scatter(v, blk, off, kv[i])


def _median_ms(fn: Any, reps: int) -> float:
    """Median CPU time of this thread per call: the work is single-threaded, and on a shared
    machine the thread's CPU time is far steadier than wall time."""
    fn()
    xs = []
    for _ in range(reps):
        t0 = time.thread_time()
        fn()
        xs.append((time.thread_time() - t0) * 1e3)
    return statistics.median(xs)


def run(quick: bool) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    reps = 15 if quick else 60
    rows = []
    shapes = SHAPES[:1] if quick else SHAPES
    schemes = ["int4"] if quick else ["none", "int8", "int4"]
    for name, layers, heads, dim in shapes:
        for tokens in [1024] if quick else [1024, 2048]:
            for scheme in schemes:
                r = _rig(layers, heads, dim, tokens, scheme)
                layout: PagedLayout = r["layout"]
                views = [layout.keys_values(t) for t in r["paged"]]
                loader = PagedLoader(layout, views)
                shape = ChunkShape(layers, CHUNK, heads, dim, torch.float32)

                def new(
                    clock: StageClock | None = None,
                    loader: PagedLoader = loader,
                    r: dict[str, Any] = r,
                    shape: ChunkShape = shape,
                    tokens: int = tokens,
                ) -> None:
                    done = loader.load(r["blobs"], shape, 0, 0, tokens, r["blocks"], clock)
                    assert done.end == tokens and done.refused is None

                _old(r, views, tokens)
                want = [t.clone() for t in r["paged"]]
                for t in r["paged"]:
                    t.zero_()
                new()
                exact = all(torch.equal(a, b) for a, b in zip(want, r["paged"], strict=True))
                old_ms = _median_ms(lambda r=r, v=views, n=tokens: _old(r, v, n), reps)
                new_ms = _median_ms(new, reps)
                stages: dict[str, list[float]] = {}
                for _ in range(reps):
                    c = StageClock(time.thread_time)
                    new(c)
                    for k, v in c.as_ms().items():
                        stages.setdefault(k, []).append(v)
                bf16 = layers * 2 * tokens * heads * dim * 2
                dec = statistics.median(stages["decode"])
                rows.append(
                    {
                        "shape": name,
                        "tokens": tokens,
                        "scheme": scheme,
                        "old_ms": round(old_ms, 3),
                        "new_ms": round(new_ms, 3),
                        "speedup": round(old_ms / new_ms, 2),
                        "decode_ms": round(dec, 3),
                        "copy_ms": round(statistics.median(stages["copy"]), 3),
                        "decode_gbps": round(bf16 / (dec / 1e3) / 1e9, 2),
                        "bit_exact": exact,
                    }
                )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shape, 1k tokens, int4 only")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    rows = run(args.quick)
    from rich.console import Console
    from rich.table import Table

    t = Table(title="Load path: decode + copy into paged blocks, one core (ms per attach)")
    for col in rows[0]:
        t.add_column(col, justify="right")
    for row in rows:
        t.add_row(*(str(v) for v in row.values()))
    Console().print(t)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    return 0 if all(r["bit_exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

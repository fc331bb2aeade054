"""Built-in model presets.

``tiny`` is trained (briefly) on the Python standard library's own source, so its next-token
distributions are peaked and its attention is meaningful: it is the embedded default and the
test model. The ``*-shape`` presets have the exact layer shapes of real models with seeded
random weights: for performance benchmarks only; they produce no meaningful text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TrainSpec:
    """How a trained preset is trained (all of it is part of the build's identity)."""

    corpus_bytes: int
    vocab_size: int
    seq_len: int
    batch_size: int
    steps: int
    lr: float
    warmup: int
    seed: int = 1234
    threads: int = 2


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    architecture: str  # "llama" or "qwen2"
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rope_theta: float = 100000.0
    train: TrainSpec | None = None
    #: bump when the builder's output for this preset changes
    version: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def dir_name(self) -> str:
        return f"{self.name}-v{self.version}"


_TINY_TRAIN = TrainSpec(
    corpus_bytes=6_000_000,
    vocab_size=4096,
    seq_len=256,
    batch_size=8,
    steps=400,
    lr=3e-3,
    warmup=30,
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="tiny",
            description="Llama, 4 layers, 2 KV heads, head_dim 64, ~3.5M parameters, trained "
            "on the Python standard library (embedded default, tests).",
            architecture="llama",
            hidden_size=256,
            intermediate_size=688,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            head_dim=64,
            train=_TINY_TRAIN,
        ),
        Preset(
            name="tiny-smoke",
            description="The tiny architecture trained for a few steps on a small corpus: "
            "exercises the training path quickly (determinism tests).",
            architecture="llama",
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=2,
            num_kv_heads=1,
            head_dim=32,
            train=TrainSpec(
                corpus_bytes=200_000,
                vocab_size=512,
                seq_len=64,
                batch_size=4,
                steps=5,
                lr=1e-3,
                warmup=1,
            ),
        ),
        Preset(
            name="qwen2.5-0.5b-shape",
            description="Qwen2.5-0.5B layer shapes (24 layers, hidden 896, 14 heads, 2 KV heads,"
            " head_dim 64), random weights: benchmarks only, no meaningful text.",
            architecture="qwen2",
            hidden_size=896,
            intermediate_size=4864,
            num_layers=24,
            num_heads=14,
            num_kv_heads=2,
            head_dim=64,
            max_position_embeddings=8192,
            rope_theta=1000000.0,
        ),
        Preset(
            name="llama3-8b-shape",
            description="Llama-3-8B layer shapes (hidden 4096, 32 heads, 8 KV heads, head_dim "
            "128) with 4 layers, random weights: benchmarks only, no meaningful text.",
            architecture="llama",
            hidden_size=4096,
            intermediate_size=14336,
            num_layers=4,
            num_heads=32,
            num_kv_heads=8,
            head_dim=128,
            max_position_embeddings=8192,
            rope_theta=500000.0,
        ),
    )
}

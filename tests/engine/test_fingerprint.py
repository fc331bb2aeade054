"""The model fingerprint follows the weights' contents: weights replaced in place by files of
the same names and sizes change it (their old KV must not load), and a node computes the same
fingerprint as the gateway from the arguments it is started with."""

from __future__ import annotations

import json
import os
from pathlib import Path

from kvaas.engine.model_info import model_fingerprint
from kvaas.engine.node import node_fingerprint


def _model(d: Path, weights: bytes) -> Path:
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "float32"}))
    (d / "model.safetensors").write_bytes(weights)
    return d


def test_weights_replaced_in_place_change_the_fingerprint(tmp_path: Path) -> None:
    d = _model(tmp_path / "m", b"\x01" * 4096)
    before = model_fingerprint(d, "float32")
    w = d / "model.safetensors"
    st = w.stat()
    w.write_bytes(b"\x02" * 4096)  # same name, same size: other weights
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert model_fingerprint(d, "float32") != before


def test_the_same_contents_give_the_same_fingerprint(tmp_path: Path) -> None:
    a = _model(tmp_path / "a", b"\x05" * 1000)
    b = _model(tmp_path / "b", b"\x05" * 1000)
    assert model_fingerprint(a, "float32") == model_fingerprint(b, "float32")
    assert model_fingerprint(a, "float32") != model_fingerprint(a, "bfloat16")


def test_a_node_reports_the_gateways_fingerprint(tmp_path: Path) -> None:
    d = _model(tmp_path / "m", b"\x07" * 512)
    argv = ["--model", str(d), "--served-model-name", "m", "--dtype", "float32", "--port", "1"]
    assert node_fingerprint(argv) == model_fingerprint(d, "float32")
    # "auto": the checkpoint's dtype, as the gateway resolves it
    assert node_fingerprint(["--model", str(d)]) == model_fingerprint(d, "float32")

"""Model builder: determinism, shipped artifact integrity, loading in transformers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kvaas.model_presets import PRESETS, build_model, resolve_model
from kvaas.model_presets.builder import MANIFEST, verify_manifest


def _tree(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_training_build_is_deterministic(tmp_path: Path) -> None:
    a = build_model("tiny-smoke", tmp_path / "a")
    b = build_model("tiny-smoke", tmp_path / "b")
    ta, tb = _tree(a), _tree(b)
    assert set(ta) >= {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        MANIFEST,
    }
    assert ta == tb


def test_shipped_tiny_artifact_is_intact_and_learned(tmp_path: Path) -> None:
    out = build_model("tiny", tmp_path / "tiny")
    verify_manifest(out)
    report = json.loads((out / "kvaas-training.json").read_text())
    # the model has learned: held-out loss far below the uniform distribution's
    assert report["heldout_loss"] < 0.65 * report["uniform_loss"]
    assert sum(f.stat().st_size for f in out.iterdir()) < 20 * 1024 * 1024
    cfg = json.loads((out / "config.json").read_text())
    p = PRESETS["tiny"]
    assert (cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_dim"]) == (
        p.num_layers,
        p.num_kv_heads,
        p.head_dim,
    )


def test_corrupt_artifact_copy_is_detected(tmp_path: Path) -> None:
    out = build_model("tiny", tmp_path / "tiny")
    with (out / "tokenizer.json").open("ab") as f:
        f.write(b" ")
    with pytest.raises(ValueError, match="manifest"):
        verify_manifest(out)


def test_transformers_loads_and_predicts_python(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model("tiny", tmp_path)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    text = "import os\nimport sys\n\n\ndef main():\n    return 0\n\n\nif __name__ == '__main__':\n"
    ids = tok(text, return_tensors="pt").input_ids
    assert ids[0, 0] == tok.bos_token_id
    with torch.no_grad():
        loss = float(model(ids, labels=ids).loss)
    assert loss < 0.6 * math.log(tok.vocab_size)  # far from uniform on ordinary Python
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|user|>\nhi<|eos|>\n<|assistant|>\n"


def test_shape_preset_has_real_shapes(tmp_path: Path) -> None:
    out = build_model("qwen2.5-0.5b-shape", tmp_path / "q", layers=2)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen2"
    assert (
        cfg["hidden_size"],
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
        cfg["intermediate_size"],
        cfg["num_hidden_layers"],
    ) == (896, 14, 2, 4864, 2)


def test_resolve_model_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither a preset"):
        resolve_model("no-such-model", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"config\.json"):
        resolve_model(str(tmp_path / "empty"), tmp_path)

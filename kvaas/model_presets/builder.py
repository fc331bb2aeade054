"""Build Hugging Face-format model directories for the built-in presets, offline.

``build_model(preset, out_dir)`` writes ``config.json``, ``model.safetensors``,
``generation_config.json``, ``tokenizer.json`` and ``tokenizer_config.json`` (with a chat
template). The same preset and builder version give the same bytes: seeds are fixed, inputs are
sorted, training runs with a fixed thread count and deterministic algorithms, and no timestamp
is written. A trained preset whose finished artifact ships with the package
(``kvaas/model_presets/artifacts/<preset>-v<version>/``) is copied and verified against its sha256
manifest instead of retrained, unless ``retrain=True``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvaas.model_presets.presets import PRESETS, Preset, TrainSpec

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
MANIFEST = "kvaas-manifest.json"
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|eos|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
Progress = Callable[[str, float], None]


def _noop(_msg: str, _frac: float) -> None:
    pass


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}") from None


# --- tokenizer -----------------------------------------------------------------------------


def train_tokenizer(text: str, vocab_size: int) -> Any:
    """A byte-level BPE tokenizer with BOS added to every encoded sequence."""
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # deterministic merges
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.split("\n\n"), trainer)
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", bos)]
    )
    return tok


def _write_tokenizer(tok: Any, out: Path, max_len: int) -> None:
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|eos|>",
        "pad_token": "<|pad|>",
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    special = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


# --- model ---------------------------------------------------------------------------------


def hf_config(preset: Preset, vocab_size: int, tok: Any, layers: int | None = None) -> Any:
    from transformers import LlamaConfig, Qwen2Config

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=layers or preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_kv_heads,
        max_position_embeddings=preset.max_position_embeddings,
        rope_theta=preset.rope_theta,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tok.token_to_id("<|bos|>"),
        eos_token_id=tok.token_to_id("<|eos|>"),
        pad_token_id=tok.token_to_id("<|pad|>"),
        dtype="float32" if preset.train else "bfloat16",
    )
    if preset.architecture == "qwen2":
        return Qwen2Config(**common)
    return LlamaConfig(head_dim=preset.head_dim, **common)


def _lr_at(step: int, spec: TrainSpec) -> float:
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    frac = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train_model(preset: Preset, tok: Any, text: str, progress: Progress) -> tuple[Any, dict]:
    """Train ``preset`` on ``text``; returns the model and its training report."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    spec = preset.train
    assert spec is not None
    torch.manual_seed(spec.seed)
    torch.set_num_threads(spec.threads)
    torch.use_deterministic_algorithms(True)
    ids = np.array(tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)
    split = int(len(ids) * 0.95)
    train_ids, val_ids = ids[:split], ids[split:]
    config = hf_config(preset, tok.get_vocab_size(), tok)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(spec.seed)
    bos = tok.token_to_id("<|bos|>")
    losses: list[float] = []
    model.train()
    for step in range(spec.steps):
        starts = rng.integers(0, len(train_ids) - spec.seq_len, size=spec.batch_size)
        batch = np.stack([train_ids[s : s + spec.seq_len - 1] for s in starts])
        x = torch.from_numpy(np.concatenate([np.full((len(batch), 1), bos), batch], axis=1))
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, spec)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        progress(
            f"training step {step + 1}/{spec.steps} loss {losses[-1]:.3f}", (step + 1) / spec.steps
        )
    model.eval()
    with torch.no_grad():
        n = min(len(val_ids) // spec.seq_len, 32)
        vx = torch.from_numpy(val_ids[: n * spec.seq_len].reshape(n, spec.seq_len))
        val_loss = float(model(input_ids=vx, labels=vx).loss)
    torch.use_deterministic_algorithms(False)
    report = {
        "final_train_loss": round(float(np.mean(losses[-20:])), 4),
        "heldout_loss": round(val_loss, 4),
        "uniform_loss": round(math.log(tok.get_vocab_size()), 4),
        "train_tokens": len(train_ids),
        "steps": spec.steps,
    }
    return model, report


def _random_model(preset: Preset, tok: Any, layers: int | None) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = hf_config(preset, tok.get_vocab_size(), tok, layers)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.to(torch.bfloat16)


# --- build ---------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(out: Path) -> dict[str, str]:
    files = {p.name: _sha256(p) for p in sorted(out.iterdir()) if p.name != MANIFEST}
    (out / MANIFEST).write_text(json.dumps(files, indent=2, sort_keys=True) + "\n")
    return files


def verify_manifest(out: Path) -> None:
    manifest = json.loads((out / MANIFEST).read_text())
    for name, digest in manifest.items():
        if _sha256(out / name) != digest:
            raise ValueError(f"{out / name} does not match its manifest (corrupt artifact)")


def _tiny_tokenizer() -> Any:
    """The tokenizer of the shipped ``tiny`` artifact (shape presets reuse its vocabulary)."""
    from tokenizers import Tokenizer

    art = ARTIFACTS / PRESETS["tiny"].dir_name / "tokenizer.json"
    if art.exists():
        return Tokenizer.from_file(str(art))
    from kvaas.model_presets.corpus import corpus_text

    return train_tokenizer(corpus_text(1_000_000), 4096)


def _build_into(
    preset: Preset, out: Path, retrain: bool, layers: int | None, progress: Progress
) -> None:
    artifact = ARTIFACTS / preset.dir_name
    if preset.train and artifact.is_dir() and not retrain and layers is None:
        progress("copying the shipped artifact", 0.5)
        for f in sorted(artifact.iterdir()):
            shutil.copyfile(f, out / f.name)
        verify_manifest(out)
        return
    if preset.train:
        from kvaas.model_presets.corpus import corpus_text

        progress("reading the training corpus", 0.0)
        text = corpus_text(preset.train.corpus_bytes)
        progress("training the tokenizer", 0.0)
        tok = train_tokenizer(text, preset.train.vocab_size)
        model, report = train_model(preset, tok, text, progress)
        (out / "kvaas-training.json").write_text(
            json.dumps(report, indent=2, sort_keys=True) + "\n"
        )
    else:
        tok = _tiny_tokenizer()
        progress("initialising seeded random weights", 0.3)
        model = _random_model(preset, tok, layers)
    progress("saving", 0.95)
    model.save_pretrained(out, safe_serialization=True)
    _write_tokenizer(tok, out, preset.max_position_embeddings)
    cfg = json.loads((out / "config.json").read_text())
    cfg["kvaas_preset"] = {"name": preset.name, "version": preset.version}
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    write_manifest(out)


def build_model(
    preset: str,
    out_dir: Path,
    *,
    retrain: bool = False,
    force: bool = False,
    layers: int | None = None,
    progress: Progress | None = None,
) -> Path:
    """Build ``preset`` into ``out_dir`` (atomically: a temp dir renamed into place).

    An existing complete build is kept unless ``force``. ``layers`` overrides the layer count
    of shape presets (for quick benchmarks). Returns ``out_dir``.
    """
    p = get_preset(preset)
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST).exists() and not force:
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        t0 = time.perf_counter()
        _build_into(p, tmp, retrain, layers, progress or _noop)
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        if force and out_dir.exists():
            shutil.rmtree(out_dir)
        try:
            tmp.rename(out_dir)
        except OSError:
            if not (out_dir / MANIFEST).exists():  # not a concurrent builder that won
                raise
        (progress or _noop)(f"built {preset} in {time.perf_counter() - t0:.1f} s", 1.0)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_model(name_or_path: str, data_dir: Path, *, progress: Progress | None = None) -> Path:
    """A model directory for a preset name (built on first use under ``data_dir/models``) or
    an existing Hugging Face checkpoint directory."""
    if name_or_path in PRESETS:
        p = PRESETS[name_or_path]
        return build_model(name_or_path, Path(data_dir) / "models" / p.dir_name, progress=progress)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"{path} is not a Hugging Face checkpoint (no config.json)")
        return path
    raise ValueError(
        f"model {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a directory"
    )

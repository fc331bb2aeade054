"""What the gateway knows about the served model: where it is, its tokenizer and fingerprint."""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")

#: content digests of files, by (resolved path, size, mtime_ns): a file is read once per
#: process unless it changes (replacing it in place changes its mtime, and usually its size)
_DIGESTS: dict[tuple[str, int, int], str] = {}
_DIGESTS_LOCK = threading.Lock()


def file_digest(path: Path) -> str:
    """SHA-256 of the contents of ``path``, remembered by its path, size and ``mtime_ns``."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _DIGESTS_LOCK:
        known = _DIGESTS.get(key)
    if known is not None:
        return known
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    digest = h.hexdigest()
    with _DIGESTS_LOCK:
        _DIGESTS[key] = digest
    return digest


def model_fingerprint(model_dir: Path, kv_dtype: str) -> str:
    """A stable identity of a model's KV: the contents of ``config.json`` and of every weight
    file (with its name; the built-in manifest too when present) and the KV dtype. Weights
    replaced in place, even by files of the same names and sizes, change it. Two directories
    with the same fingerprint produce interchangeable KV; chunk keys include it, and remote
    engine nodes must report the gateway's (:mod:`kvaas.engine.node`)."""
    h = hashlib.sha256()
    h.update((model_dir / "config.json").read_bytes())
    manifest = model_dir / "kvaas-manifest.json"
    if manifest.is_file():
        h.update(manifest.read_bytes())
    for p in sorted(model_dir.iterdir()):
        if p.suffix in WEIGHT_SUFFIXES:
            h.update(f"{p.name}:{p.stat().st_size}:{file_digest(p)}\n".encode())
    h.update(kv_dtype.encode())
    return h.hexdigest()[:32]


@dataclass
class ModelInfo:
    """The served model: directory, public name, tokenizer, KV fingerprint."""

    path: Path
    name: str
    fingerprint: str
    tokenizer: Any

    @classmethod
    def load(cls, path: Path, name: str, kv_dtype: str) -> ModelInfo:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path))
        return cls(
            path=path, name=name, fingerprint=model_fingerprint(path, kv_dtype), tokenizer=tok
        )

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)

    def encode_messages(
        self, messages: list[dict[str, str]], *, add_generation_prompt: bool, continuation: bool
    ) -> list[int]:
        """Token ids of chat ``messages`` through the model's chat template (a plain
        ``role: content`` rendering when it has none). ``continuation``: the tokens follow
        earlier ones, so no BOS is added."""
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            if add_generation_prompt:
                text += "assistant: "
        bos = self.tokenizer.bos_token or ""
        if continuation and bos and text.startswith(bos):
            text = text[len(bos) :]
        return self.encode(text, add_special_tokens=not continuation and not text.startswith(bos))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def describe(self) -> dict[str, Any]:
        cfg = json.loads((self.path / "config.json").read_text())
        return {
            "id": self.name,
            "fingerprint": self.fingerprint,
            "architecture": cfg.get("model_type"),
        }

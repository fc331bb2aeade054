"""Quality of a compression scheme, measured on a real model.

For each text: prefill a prefix with transformers, round-trip every layer's KV through the
scheme chunk by chunk (the canonical layout, ``chunk_tokens`` tokens per blob), then
teacher-force a continuation once from the decoded KV and once from the original KV and compare
the next-token distributions: KL divergence (nats, original ‖ decoded), top-1 agreement and the
change in the continuation's mean negative log-likelihood. A passkey probe (a number hidden
early in a long prefix, asked for at the end) is reported too, with whether the model can do it
at all from the original KV.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvaas import codec
from kvaas.model_presets.corpus import stdlib_files

PASSKEY = "48213"


@dataclass
class QualityReport:
    scheme: str
    ratio_vs_bf16: float
    kl_mean: float
    kl_p99: float
    top1_agreement: float
    nll_original: float
    nll_decoded: float
    positions: int
    passkey_original: bool | None = None
    passkey_decoded: bool | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def delta_log_ppl(self) -> float:
        return self.nll_decoded - self.nll_original

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["delta_log_ppl"] = self.delta_log_ppl
        return d


class LoadedModel:
    """A Hugging Face causal LM and its tokenizer, loaded once for several evaluations."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.dir = Path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.dir)
        self.model = AutoModelForCausalLM.from_pretrained(self.dir, dtype=torch.float32)
        self.model.eval()

    def prefill(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """KV of ``ids`` in the canonical layout ``[L, 2, T, H, D]`` and the last logits."""
        with torch.no_grad():
            out = self.model(ids.unsqueeze(0), use_cache=True)
        cache = out.past_key_values
        kv = torch.stack(
            [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]
        )  # [L, 2, H, T, D]
        return kv.permute(0, 1, 3, 2, 4).contiguous(), out.logits[0, -1]

    def continue_from(self, kv: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Log-probabilities at each position of ``ids`` given a prefix whose KV is ``kv``."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(kv.shape[0]):
            k = kv[i, 0].permute(1, 0, 2).unsqueeze(0).contiguous()
            v = kv[i, 1].permute(1, 0, 2).unsqueeze(0).contiguous()
            cache.update(k, v, i)
        t = kv.shape[2]
        pos = torch.arange(t, t + len(ids)).unsqueeze(0)
        with torch.no_grad():
            out = self.model(
                ids.unsqueeze(0), past_key_values=cache, position_ids=pos, use_cache=True
            )
        return torch.log_softmax(out.logits[0].float(), dim=-1)

    def greedy_from(self, kv: torch.Tensor, ids: torch.Tensor, n: int) -> list[int]:
        """``n`` greedy tokens after ``ids``, given a prefix KV (no cache reuse: small n)."""
        seq = ids.clone()
        out: list[int] = []
        for _ in range(n):
            nxt = int(self.continue_from(kv, seq)[-1].argmax())
            out.append(nxt)
            seq = torch.cat([seq, torch.tensor([nxt])])
        return out


def roundtrip(kv: torch.Tensor, scheme: str, chunk_tokens: int = 256) -> tuple[torch.Tensor, int]:
    """Encode and decode ``kv`` chunk by chunk; returns the decoded KV and total blob bytes."""
    parts, size = [], 0
    for start in range(0, kv.shape[2], chunk_tokens):
        blob = codec.encode(kv[:, :, start : start + chunk_tokens].contiguous(), scheme)
        size += len(blob)
        parts.append(codec.decode(blob))
    return torch.cat(parts, dim=2), size


def heldout_texts(count: int, min_chars: int = 12000) -> list[str]:
    """Standard-library sources from the end of the sorted file list (outside the tiny
    model's training corpus), long enough for the prefix and continuation."""
    texts = []
    for path in reversed(stdlib_files()):
        try:
            t = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(t) >= min_chars:
            texts.append(t)
        if len(texts) == count:
            break
    return texts


def _passkey_prompt(filler: str) -> tuple[str, str]:
    head = f'PASSKEY = "{PASSKEY}"\n\n'
    tail = '\n\nassert check(PASSKEY) == "'
    return head + filler + tail, PASSKEY


def evaluate_scheme(
    lm: LoadedModel,
    scheme: str,
    *,
    prefix_tokens: int = 768,
    continuation_tokens: int = 128,
    texts: int = 4,
    chunk_tokens: int = 256,
    passkey: bool = True,
) -> QualityReport:
    """Measure ``scheme`` on ``texts`` held-out texts (see module docstring)."""
    kls: list[torch.Tensor] = []
    agree = total = 0
    nll_o = nll_d = 0.0
    raw_bytes = blob_bytes = 0
    for text in heldout_texts(texts):
        ids = torch.tensor(lm.tokenizer(text).input_ids[: prefix_tokens + continuation_tokens])
        if len(ids) < prefix_tokens + continuation_tokens:
            continue
        prefix, cont = ids[:prefix_tokens], ids[prefix_tokens:]
        kv, _ = lm.prefill(prefix)
        dec, size = roundtrip(kv, scheme, chunk_tokens)
        raw_bytes += kv.numel() * 2
        blob_bytes += size
        lp_o = lm.continue_from(kv, cont)
        lp_d = lm.continue_from(dec, cont)
        kls.append((lp_o.exp() * (lp_o - lp_d)).sum(-1).clamp_min(0))
        agree += int((lp_o.argmax(-1) == lp_d.argmax(-1)).sum())
        total += len(cont)
        tgt = cont[1:]
        nll_o += float(-lp_o[:-1].gather(1, tgt[:, None]).sum())
        nll_d += float(-lp_d[:-1].gather(1, tgt[:, None]).sum())
    if not total:
        raise ValueError("no held-out text was long enough")
    kl = torch.cat(kls)
    n_pred = total - len(kls)
    report = QualityReport(
        scheme=scheme,
        ratio_vs_bf16=raw_bytes / blob_bytes,
        kl_mean=float(kl.mean()),
        kl_p99=float(torch.quantile(kl, 0.99)),
        top1_agreement=agree / total,
        nll_original=nll_o / n_pred,
        nll_decoded=nll_d / n_pred,
        positions=total,
    )
    if passkey:
        filler = heldout_texts(1)[0]
        prompt, answer = _passkey_prompt(filler[: 4 * prefix_tokens])
        ids = torch.tensor(lm.tokenizer(prompt).input_ids)
        cut = (len(ids) - 8) // chunk_tokens * chunk_tokens  # cache covers whole chunks
        kv, _ = lm.prefill(ids[:cut])
        dec, _ = roundtrip(kv, scheme, chunk_tokens)
        n_answer = len(lm.tokenizer(answer, add_special_tokens=False).input_ids)
        got_o = str(lm.tokenizer.decode(lm.greedy_from(kv, ids[cut:], n_answer)))
        got_d = str(lm.tokenizer.decode(lm.greedy_from(dec, ids[cut:], n_answer)))
        report.passkey_original = got_o.startswith(answer)
        report.passkey_decoded = got_d.startswith(answer)
        report.details["passkey_outputs"] = {"original": got_o, "decoded": got_d}
    if math.isnan(report.kl_mean):
        raise ValueError("quality evaluation produced NaN")
    return report

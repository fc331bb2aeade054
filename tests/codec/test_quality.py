"""Quality thresholds of the lossy schemes, measured on the trained tiny model."""

from __future__ import annotations

import pytest

from kvaas.codec.quality import LoadedModel, evaluate_scheme
from kvaas.model_presets import resolve_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return LoadedModel(resolve_model("tiny", tmp_path_factory.mktemp("models")))


@pytest.mark.parametrize("scheme", ["none", "lossless"])
def test_bit_exact_schemes_change_nothing(lm: LoadedModel, scheme: str) -> None:
    r = evaluate_scheme(
        lm, scheme, prefix_tokens=512, continuation_tokens=64, texts=2, passkey=False
    )
    assert r.kl_mean == 0.0 and r.top1_agreement == 1.0
    assert r.nll_decoded == r.nll_original


@pytest.mark.parametrize(
    ("scheme", "max_kl", "min_top1", "min_ratio"),
    [("int8", 0.005, 0.98, 1.9), ("int4", 0.02, 0.95, 3.5)],
)
def test_lossy_schemes_meet_quality_targets(
    lm: LoadedModel, scheme: str, max_kl: float, min_top1: float, min_ratio: float
) -> None:
    r = evaluate_scheme(
        lm, scheme, prefix_tokens=768, continuation_tokens=128, texts=3, passkey=False
    )
    assert r.kl_mean <= max_kl, r
    assert r.top1_agreement >= min_top1, r
    assert r.ratio_vs_bf16 >= min_ratio, r
    assert r.kl_mean > 0  # it really is lossy: the harness sees the difference

"""The price book: validation names the bad field, versions apply by date, rounding."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest

from kvaas.billing.pricebook import PriceBookError, load_pricebook, parse_pricebook, to_minor
from kvaas.config import Settings

GOOD = (Path(__file__).parents[2] / "billing" / "pricebook.yaml").read_text()


def test_packaged_pricebook_is_valid() -> None:
    pb = load_pricebook()
    assert pb.currency == "USD" and len(pb.versions) >= 2
    assert pb.version_for(date(2026, 9, 30)).version == "2026-01"
    assert pb.version_for(date(2026, 10, 1)).version == "2026-10"
    with pytest.raises(PriceBookError, match="no price book version"):
        pb.version_for(date(2025, 12, 31))


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (('hot: "4.50"', 'hot: "cheap"'), "versions.1.storage_per_mtok_hour.hot"),
        (('prefill_per_mtok: "1.00"', 'prefill_per_mtok: "-1"'), "versions.1.prefill_per_mtok"),
        (("currency: USD", "currency: dollars"), "currency"),
        (("cached_tokens: 1000000", "cached_tokens: -5"), "versions.1.free_tier.cached_tokens"),
        (("effective_from: 2026-10-01", "effective_from: 2025-10-01"), "(top level)"),
        (('    output_per_mtok: "2.00"\n', ""), "versions.1.output_per_mtok"),
    ],
)
def test_errors_name_the_field(edit: tuple[str, str], field: str) -> None:
    assert edit[0] in GOOD
    with pytest.raises(PriceBookError) as err:
        parse_pricebook(GOOD.replace(edit[0], edit[1]), "pb.yaml")
    assert f"`{field}`" in str(err.value) and str(err.value).startswith("pb.yaml: field")


def test_rounding_is_half_up_to_the_minor_unit() -> None:
    assert to_minor(Decimal("0.005"), 2) == 1
    assert to_minor(Decimal("0.0049999"), 2) == 0
    assert to_minor(Decimal("0.015"), 2) == 2  # not banker's rounding
    assert to_minor(Decimal("12.345"), 2) == 1235


async def test_start_up_fails_on_a_bad_pricebook(tmp_path: Path) -> None:
    from kvaas.app import create_app

    bad = tmp_path / "pb.yaml"
    bad.write_text(GOOD.replace('standard: "1.00"', "standard: []"))
    app = create_app(
        Settings(_env_file=None, engine="none", data_dir=tmp_path, pricebook_path=bad)  # type: ignore[call-arg]
    )
    with pytest.raises(PriceBookError, match=r"storage_per_mtok_hour\.standard"):
        async with app.router.lifespan_context(app):
            pass

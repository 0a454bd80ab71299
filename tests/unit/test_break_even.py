"""Break-even arithmetic: one self-hosted instance against a managed API priced per token."""

from __future__ import annotations

import json
import math

import pytest

from embedsvc.services.costs import HOURS_PER_MONTH, BreakEven


def be(tps: float, usd_per_hour: float, utilization: float = 0.5, price: float = 0.02) -> BreakEven:
    return BreakEven(tps, usd_per_hour, utilization, price, "text-embedding-3-small")


@pytest.mark.parametrize(
    ("tps", "usd_per_hour", "utilization", "price", "instance", "capacity", "break_even", "exceeds"),
    [
        # A CPU box: $0.10/h is $73 a month; 400 tokens/s at half load is 525.6M tokens a month, but the
        # API charges $73 only for 3.65 billion tokens: one instance cannot get there.
        (400, 0.10, 0.5, 0.02, 73.0, 525_600_000, 3_650_000_000, True),
        # A GPU: $1.00/h, 100k tokens/s busy 50%: 131.4 billion tokens of capacity, break-even 36.5 billion.
        (100_000, 1.00, 0.5, 0.02, 730.0, 131_400_000_000, 36_500_000_000, False),
        # text-embedding-3-large's price moves the break-even 6.5x lower.
        (100_000, 1.00, 0.5, 0.13, 730.0, 131_400_000_000, 730 / 0.13e-6, False),
    ],
)
def test_the_arithmetic(tps, usd_per_hour, utilization, price, instance, capacity, break_even, exceeds):
    result = be(tps, usd_per_hour, utilization, price)
    assert result.instance_usd_per_month == pytest.approx(instance)
    assert result.capacity_tokens_per_month == pytest.approx(capacity)
    assert result.break_even_tokens_per_month == pytest.approx(break_even)
    assert result.exceeds_capacity is exceeds
    # At the break-even both sides cost the instance's month (one instance, if it can serve it).
    assert result.managed_usd(result.break_even_tokens_per_month) == pytest.approx(instance)
    # Cheaper self-hosted per token exactly when one instance can serve its break-even.
    assert (result.self_hosted_usd_per_million > price) is exceeds


def test_self_hosting_buys_whole_instances():
    result = be(1000, 0.5, 1.0)
    capacity = 1000 * 3600 * HOURS_PER_MONTH
    assert result.self_hosted_usd(0) == result.instance_usd_per_month  # an idle instance still bills
    assert result.self_hosted_usd(capacity) == result.instance_usd_per_month
    assert result.self_hosted_usd(capacity + 1) == 2 * result.instance_usd_per_month


def test_a_free_model_never_breaks_even():
    result = be(1000, 0.5, price=0.0)
    assert math.isinf(result.break_even_tokens_per_month)
    assert result.as_dict()["break_even_tokens_per_month"] is None
    assert "never breaks even" in result.explain()[-1]


def test_the_explanation_shows_every_step_and_the_capacity_verdict():
    lines = "\n".join(be(400, 0.10).explain())
    assert "$0.1/h x 730 h = $73.00" in lines
    assert "400 tokens/s x 0.5 x 3,600 s x 730 h = 525,600,000 tokens" in lines
    assert "= 3,650,000,000 tokens/month" in lines
    assert "exceeds what one instance can serve" in lines
    assert "self-hosting is cheaper" in "\n".join(be(100_000, 1.0).explain())


def test_the_cli_prints_the_arithmetic_a_json_line_and_the_chart(env, tmp_path, capsys):
    from embedsvc.cli import main

    chart = tmp_path / "be.png"
    args = ["costs", "break-even", "--tokens-per-second", "100000", "--instance-usd-per-hour", "1.0"]
    assert main([*args, "--utilization", "0.5", "--format", "json", "--chart", str(chart)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    answer = json.loads(out[-1])
    assert answer["break_even_tokens_per_month"] == pytest.approx(36_500_000_000)
    assert answer["price_per_million"] == 0.02 and answer["exceeds_capacity"] is False
    assert any("break-even volume" in line for line in out)
    assert chart.read_bytes()[:4] == b"\x89PNG"
    assert main([*args, "--utilization", "1.5"]) == 2  # a share, not a percentage

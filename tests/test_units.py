import pytest

from remat import BudgetError, Profile, format_bytes, parse_budget, parse_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [("6GiB", 6 * 2**30), ("6GB", 6 * 10**9), ("750MiB", 750 * 2**20), ("1.5 GiB", 3 * 2**29), ("1024", 1024),
     ("2k", 2048), ("10 b", 10), (4096, 4096)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["6 apples", "GiB", "-5GiB", -1, "", "1.2.3GiB", True, 2.5])
def test_parse_bytes_rejects_with_the_value_in_the_message(bad):
    with pytest.raises(BudgetError) as e:
        parse_bytes(bad)
    assert repr(bad) in str(e.value) or str(bad) in str(e.value)


def test_format_bytes():
    assert format_bytes(0) == "0 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(80 * 2**30) == "80.00 GiB"
    assert format_bytes(-2**20) == "-1.00 MiB"


def test_budget_fraction_and_percent_are_shares_of_the_no_checkpointing_peak():
    p = Profile.from_lists([10] * 4, [40] * 3 + [0], [1.0] * 4, [2.0] * 4)
    from remat import simulate, solve

    none = simulate(p, solve(p, None, strategy="none")).peak_bytes
    assert parse_budget(0.5, p) == int(0.5 * none)
    assert parse_budget("50%", p) == int(0.5 * none)
    assert parse_budget("0.5", p) == int(0.5 * none)
    assert parse_budget("100", p) == 100
    assert parse_budget(None, p) is None
    for bad in (0.0, 1.5, "150%", "-0.5"):
        with pytest.raises(BudgetError):
            parse_budget(bad, p)

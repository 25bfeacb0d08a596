from fractions import Fraction

import numpy as np
import pytest

from remat import BudgetError, Profile, format_bytes, parse_bytes
from remat.planning.budget import parse_budget, share


@pytest.mark.parametrize(
    ("text", "expected"),
    [("6GiB", 6 * 2**30), ("6GB", 6 * 10**9), ("750MiB", 750 * 2**20), ("1.5 GiB", 3 * 2**29), ("1024", 1024),
     ("2k", 2048), ("10 b", 10), (4096, 4096), (np.int64(4096), 4096)],
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


def peak(p):
    from remat import simulate, solve

    return simulate(p, solve(p, None, strategy="none")).peak_bytes


P = Profile.from_lists([10] * 4, [40] * 3 + [0], [1.0] * 4, [2.0] * 4)


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        (None, None),
        (100, 100),  # an int is bytes
        (np.int64(100), 100),  # so is anything operator.index accepts
        (np.uint8(7), 7),
        ("100", 100),  # a digit string is bytes
        ("6GiB", 6 * 2**30),
        ("6GB", 6 * 10**9),
        ("750MiB", 750 * 2**20),
        ("1.5 GiB", 3 * 2**29),
        ("50%", Fraction(1, 2)),  # shares of the no-checkpointing peak
        (" 12.5 % ", Fraction(1, 8)),
        ("150%", Fraction(3, 2)),
        (share(0.5), Fraction(1, 2)),
        (share(1.5), Fraction(3, 2)),
        (share(Fraction(1, 3)), Fraction(1, 3)),
        (share("0.25"), Fraction(1, 4)),
        (0.5, Fraction(1, 2)),  # a float in (0, 1) is a share
        (np.float64(0.25), Fraction(1, 4)),
        ("0.5", Fraction(1, 2)),  # a decimal string reads as the float it spells
    ],
)
def test_budget_meanings(budget, expected):
    got = parse_budget(budget, P)
    if isinstance(expected, Fraction):
        assert got == int(expected * peak(P))
    else:
        assert got == expected


def test_a_zero_d_integer_tensor_is_bytes():
    torch = pytest.importorskip("torch")
    assert parse_budget(torch.tensor(4096), P) == 4096
    with pytest.raises(BudgetError, match=r"tensor\(0.5000\).*is not a budget"):
        parse_budget(torch.tensor(0.5), P)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (80e9, r"budget 80000000000.0 is a float: as bytes it would be 74.51 GiB, as a share 8e\+10 × the"
               r" no-checkpointing peak; pass int\(80000000000.0\) or a size like '6GiB' for bytes, or '50%' or"
               r" share\(0.5\) for a share"),
        (1.5, r"budget 1.5 is a float: .* or '150%' or share\(1.5\) for a share"),
        (1.0, r"budget 1.0 is a float"),
        ("1.5", r"budget '1.5' is a decimal number: as bytes it would be 1.5 B"),
        ("1e9", r"budget '1e9' is a decimal number"),
        (0.0, r"budget 0.0 must be a positive finite number"),
        (-0.5, r"budget -0.5 must be a positive"),
        ("-0.5", r"budget '-0.5' must be a positive"),
        (float("nan"), r"budget nan must be a positive finite number"),
        (-1, r"budget -1 is negative"),
        (True, r"budget True is a bool"),
        ("0%", r"budget '0%' must be above 0%"),
        ("lots%", r"budget 'lots%' is not a percentage like '50%'"),
        ("lots", r"budget 'lots' is not a size"),
        ("6 apples", r"unknown unit 'apples'"),
        (Fraction(1, 2), r"budget Fraction\(1, 2\) is a Fraction; for a share write share\(Fraction\(1, 2\)\)"),
        ([1], r"budget \[1\] \(list\) is not a budget; give bytes as an int"),
    ],
)
def test_budget_refusals_name_the_value_and_the_fix(bad, message):
    with pytest.raises(BudgetError, match=message):
        parse_budget(bad, P)


@pytest.mark.parametrize("bad", [0, -0.5, "lots", True, float("inf"), None, [1]])
def test_share_refuses_what_is_not_a_positive_number(bad):
    with pytest.raises(BudgetError, match=r"share\("):
        share(bad)

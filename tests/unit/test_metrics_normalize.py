"""normalize_text, exact_match and the package's public surface."""

import pytest

import tunelab.evaluate.metrics as metrics
from tunelab.evaluate.metrics import exact_match, normalize_text


def test_public_names_are_sorted_and_importable():
    assert metrics.__all__ == sorted(metrics.__all__)
    for name in metrics.__all__:
        assert getattr(metrics, name) is not None


def test_full_width_ascii_and_ideographic_space_become_half_width():
    assert normalize_text("ＧＰＴ－４　得分：９８％", case=False, whitespace=False) == "GPT-4 得分:98%"


def test_width_folding_leaves_other_compatibility_characters_alone():
    # ① and ² would become 1 and 2 under full NFKC; they are deliberately kept.
    assert normalize_text("①x²", width=True) == "①x²"


def test_whitespace_collapses_and_strips_including_ideographic_space():
    assert normalize_text("  a \t\n b　c  ", case=False, width=True) == "a b c"
    assert normalize_text("  a  b ", whitespace=False, width=False) == "  a  b "


def test_case_is_casefolded():
    assert normalize_text("Straße", case=True) == normalize_text("STRASSE", case=True)
    assert normalize_text("ABC", case=False) == "ABC"


@pytest.mark.parametrize(
    ("pred", "ref", "options", "expected"),
    [
        ("北京", "北京", {}, 1.0),
        (" 北京\n", "北京", {}, 1.0),
        ("ＹＥＳ", "yes", {}, 1.0),
        ("ＹＥＳ", "yes", {"width": False}, 0.0),
        ("yes", "ＹＥＳ", {"width": False}, 0.0),
        ("yes", "Yes", {"case": False}, 0.0),
        ("Yes", "yes", {"case": False}, 0.0),
        ("a  b", "a b", {"whitespace": False}, 0.0),
        ("北京市", "北京", {}, 0.0),
    ],
)
def test_exact_match(pred, ref, options, expected):
    assert exact_match(pred, ref, **options) == expected

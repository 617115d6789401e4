"""Text normalisation applied before answers are compared.

Models fine-tuned on Chinese data often answer with full-width letters, digits and punctuation (``ＡＢＣ１２３，``)
or the ideographic space ``U+3000``; a reference typed on an English keyboard has the half-width forms. Counting
those as mismatches measures the input method, not the model, so every metric normalises width by default.
"""

from __future__ import annotations

# Full-width forms U+FF01..U+FF5E are the printable ASCII range U+0021..U+007E shifted by 0xFEE0.
# Only this block is mapped (not full NFKC) because NFKC also rewrites characters whose difference can matter
# in an answer: circled digits (① -> 1), superscripts (x² -> x2), ligatures and compatibility ideographs.
_FULL_WIDTH_TO_ASCII = {code: code - 0xFEE0 for code in range(0xFF01, 0xFF5F)}
_FULL_WIDTH_TO_ASCII[0x3000] = ord(" ")  # ideographic space


def normalize_text(s: str, *, whitespace: bool = True, case: bool = True, width: bool = True) -> str:
    """Return ``s`` normalised for comparison.

    ``width``: full-width ASCII forms and the ideographic space become their half-width forms.
    ``case``: ``str.casefold`` (stronger than ``lower``: ``"Straße"`` and ``"STRASSE"`` compare equal).
    ``whitespace``: runs of Unicode whitespace collapse to one space; leading and trailing whitespace is removed.
    """
    if width:
        s = s.translate(_FULL_WIDTH_TO_ASCII)
    if case:
        s = s.casefold()
    if whitespace:
        s = " ".join(s.split())
    return s

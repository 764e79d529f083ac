"""Numbers typed by people: the one rule for chat, the CLI and URLs.

Python's ``int()``, ``str.isdigit()`` and ``\\d`` accept every Unicode digit (``٣``, ``१०``,
``²``), and NFKC turns ``①`` into ``1``; ``int()`` also takes ``+5``, ``1_000`` and surrounding
spaces. Amounts and issue numbers accept ASCII digits and their full-width forms (``０``-``９``,
what a Chinese keyboard types) and nothing else, so what a reader or operator sees is what
counts. Issue numbers may also be written in Chinese numerals (第十二期)."""

from __future__ import annotations

import re

from storage.errors import DomainError

# Full-width digits are what a Chinese input method produces; they mean the ASCII ones.
_FULL_WIDTH = str.maketrans("０１２３４５６７８９", "0123456789")
# Python refuses int() of more than 4300 digits; nobody types an amount that long.
_MAX_DIGITS = 4000
_UNSIGNED = re.compile(rf"[0-9]{{1,{_MAX_DIGITS}}}")
_SIGNED = re.compile(rf"-?[0-9]{{1,{_MAX_DIGITS}}}")

# Chinese numerals the issue-number converter understands, for patterns.
CHINESE_NUMERAL = "〇零一二两三四五六七八九十"
# An issue number in a command, as digits or Chinese numerals (一 … 九十九).
ISSUE_NUMBER = rf"[0-9]{{1,6}}|[{CHINESE_NUMERAL}]{{1,3}}"

_CHINESE_DIGITS = {"〇": 0, "零": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5,
                   "六": 6, "七": 7, "八": 8, "九": 9}


class BadIssueNumber(DomainError):
    """A command named an issue in a way that is no number (第一二三期)."""

    def __init__(self, text: str) -> None:
        super().__init__(f"not an issue number: {text!r}")
        self.text = text


def ascii_digits(text: str) -> str:
    """Full-width digits to ASCII; every other character unchanged."""
    return text.translate(_FULL_WIDTH)


def parse_int(text: str, *, signed: bool = False) -> int | None:
    """The whole number ``text`` spells in ASCII or full-width digits (with a leading ``-``
    when ``signed``), else None: no ``+``, no ``_``, no spaces, no other scripts' digits."""
    digits = ascii_digits(text)
    if not (_SIGNED if signed else _UNSIGNED).fullmatch(digits):
        return None
    return int(digits)


def chinese_number(text: str) -> int | None:
    """一 … 九十九 (十, 十二, 二十, 二十五, 两, and digit by digit like 一〇 or 二〇), else None."""
    if not text or any(ch not in CHINESE_NUMERAL for ch in text):
        return None
    if "十" not in text:
        if len(text) > 2 or (len(text) == 2 and "两" in text):  # 一二三, 一两: not numbers
            return None
        value = 0
        for ch in text:
            value = value * 10 + _CHINESE_DIGITS[ch]
        return value
    tens_text, _, ones_text = text.partition("十")
    if "十" in ones_text or len(tens_text) > 1 or len(ones_text) > 1 or ones_text == "两":
        return None
    tens = _CHINESE_DIGITS[tens_text] if tens_text else 1
    ones = _CHINESE_DIGITS[ones_text] if ones_text else 0
    if tens == 0 or (ones_text and ones == 0):  # 〇十, 二十零
        return None
    return tens * 10 + ones


def issue_number(text: str) -> int | None:
    """An issue number as a reader types it: digits (ASCII or full-width) or Chinese
    numerals; None when ``text`` is neither."""
    number = parse_int(text)
    return number if number is not None else chinese_number(text)

"""Keys: which ones a store can hold, their exact bytes, and their one text form.

A key is a ``str``; a file name that was not UTF-8 keeps its bytes as surrogate escapes (``os.fsdecode``), so
``key_bytes`` gives the exact bytes back. Every place that prints a key as text (the exports' ``key`` columns and
``uuids.jsonl``, ``vitok info``, messages) uses ``key_text``, which is injective: ``key_from_text`` maps a text back
to its one key. The escapes, and nothing else changes::

    \\          ->  \\\\
    a byte that is not UTF-8 (0x80-0xff)                 ->  \\xNN   (NN >= 80)
    a control character U+0000-U+001F, U+007F           ->  \\xNN   (NN < 80)
    a C1 control U+0080-U+009F, another lone surrogate   ->  \\uNNNN

So a key of printable UTF-8 without a backslash is its own text (almost every key), the text is printable UTF-8 on
one line (strict JSON and parquet readers take it), and the file named ``caf\\xe9.jpg`` (a backslash) and the file
whose name holds the byte 0xE9 get the texts ``caf\\\\xe9.jpg`` and ``caf\\xe9.jpg``.

A key that holds NUL cannot be stored: HDF5 keeps keys as variable-length strings, which end at NUL; NPY key arrays
drop trailing NULs; tar member names end at NUL. ``unstorable`` says so, and the inputs record such a sample as
skipped with that reason (its record, in the sidecar's JSON, keeps the exact key). A leaf: it imports nothing of
vitok, so the input readers may ask.
"""

from __future__ import annotations

import re

NUL = "\x00"
_ESCAPE = re.compile(r"[\\\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_TEXT_ESCAPE = re.compile(r"\\(?:(\\)|x([0-9a-f]{2})|u([0-9a-f]{4})|(.|$))", re.DOTALL)


def key_bytes(key: str) -> bytes:
    """The exact bytes of a key (UTF-8; surrogate escapes give back the bytes that were not UTF-8)."""
    return key.encode("utf-8", "surrogateescape")


def _escape(match: re.Match) -> str:
    char = match.group()
    code = ord(char)
    if char == "\\":
        return "\\\\"
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x20 or code == 0x7F:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def key_text(key: str) -> str:
    """The key's text form: printable UTF-8, one line, distinct for distinct keys (module docstring)."""
    return _ESCAPE.sub(_escape, key)


def key_from_text(text: str) -> str:
    """The key whose ``key_text`` is ``text``; ValueError for a text no key has (a lone backslash, an escape that
    ``key_text`` would not write)."""

    def unescape(match: re.Match) -> str:
        backslash, byte, code, other = match.groups()
        if backslash:
            return "\\"
        if byte is not None:
            value = int(byte, 16)
            return chr(0xDC00 + value) if value >= 0x80 else chr(value)
        if code is not None:
            return chr(int(code, 16))
        raise ValueError(f"{text!r} is not the text form of a key: a backslash before {other or 'the end'!r} "
                         "(a backslash in a key is written \\\\)")

    key = _TEXT_ESCAPE.sub(unescape, text)
    if key_text(key) != text:
        raise ValueError(f"{text!r} is not the text form of a key (that key is written {key_text(key)!r})")
    return key


def unstorable(key: str) -> str | None:
    """Why no store format can hold ``key`` (None: every format can)."""
    if NUL in key:
        return ("holds a NUL character, which store keys cannot hold (HDF5 key strings and tar member names end at "
                "NUL, NPY key arrays drop trailing ones)")
    return None

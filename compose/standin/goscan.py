"""encode/json's view of malformed input: its quoting and its syntax-error messages.

Only used on the error path (and to find where the first value ends when Go would ignore
trailing data), so clarity wins over speed here.
"""

from __future__ import annotations

from typing import Final

__all__ = ["JSONSyntaxError", "first_value_end", "quote_byte", "quote_rune"]

_SHORT_ESCAPES: Final = {
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
    "\\": "\\\\",
    '"': '\\"',
}


def quote_rune(ch: str, *, in_char_literal: bool) -> str:
    """One character as strconv.Quote writes it (`"` stays bare inside '...')."""
    if ch in _SHORT_ESCAPES and not (in_char_literal and ch == '"'):
        return _SHORT_ESCAPES[ch]
    if ch.isprintable():
        return ch
    code = ord(ch)
    if code < 0x80:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def quote_byte(byte: int) -> str:
    """encoding/json's quoteChar: the byte read as a rune, in single quotes."""
    if byte == ord("'"):
        return "'\\''"
    return "'" + quote_rune(chr(byte), in_char_literal=True) + "'"


class JSONSyntaxError(Exception):
    """The first JSON value is malformed; `str()` is encoding/json's message."""


_WS: Final = frozenset(b" \t\r\n")
_DIGITS: Final = frozenset(b"0123456789")
_HEX: Final = frozenset(b"0123456789abcdefABCDEF")


class _Scanner:
    """Walks the first JSON value like encoding/json's scanner, to name the first error."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _peek(self) -> int:
        if self.pos >= len(self.data):
            raise JSONSyntaxError("unexpected EOF")
        return self.data[self.pos]

    def _fail(self, byte: int, where: str) -> JSONSyntaxError:
        return JSONSyntaxError(f"invalid character {quote_byte(byte)} {where}")

    def _skip_ws(self) -> None:
        while self.pos < len(self.data) and self.data[self.pos] in _WS:
            self.pos += 1

    def value(self) -> None:
        self._skip_ws()
        byte = self._peek()
        if byte == ord("{"):
            self._object()
        elif byte == ord("["):
            self._array()
        elif byte == ord('"'):
            self._string()
        elif byte == ord("-") or byte in _DIGITS:
            self._number()
        elif byte in b"tfn":
            self._literal({ord("t"): b"true", ord("f"): b"false", ord("n"): b"null"}[byte])
        else:
            raise self._fail(byte, "looking for beginning of value")

    def _object(self) -> None:
        self.pos += 1
        self._skip_ws()
        if self._peek() == ord("}"):
            self.pos += 1
            return
        while True:
            self._skip_ws()
            if (byte := self._peek()) != ord('"'):
                raise self._fail(byte, "looking for beginning of object key string")
            self._string()
            self._skip_ws()
            if (byte := self._peek()) != ord(":"):
                raise self._fail(byte, "after object key")
            self.pos += 1
            self.value()
            self._skip_ws()
            byte = self._peek()
            self.pos += 1
            if byte == ord("}"):
                return
            if byte != ord(","):
                raise self._fail(byte, "after object key:value pair")

    def _array(self) -> None:
        self.pos += 1
        self._skip_ws()
        if self._peek() == ord("]"):
            self.pos += 1
            return
        while True:
            self.value()
            self._skip_ws()
            byte = self._peek()
            self.pos += 1
            if byte == ord("]"):
                return
            if byte != ord(","):
                raise self._fail(byte, "after array element")

    def _string(self) -> None:
        self.pos += 1
        while True:
            byte = self._peek()
            self.pos += 1
            if byte == ord('"'):
                return
            if byte == ord("\\"):
                escape = self._peek()
                self.pos += 1
                if escape == ord("u"):
                    for _ in range(4):
                        if (digit := self._peek()) not in _HEX:
                            raise self._fail(digit, "in \\u hexadecimal character escape")
                        self.pos += 1
                elif escape not in b'"\\/bfnrt':
                    raise self._fail(escape, "in string escape code")
            elif byte < 0x20:
                raise self._fail(byte, "in string literal")

    def _digits(self) -> None:
        while self.pos < len(self.data) and self.data[self.pos] in _DIGITS:
            self.pos += 1

    def _number(self) -> None:
        if self.data[self.pos] == ord("-"):
            self.pos += 1
            if (byte := self._peek()) not in _DIGITS:
                raise self._fail(byte, "in numeric literal")
        if self.data[self.pos] == ord("0"):
            self.pos += 1
        else:
            self._digits()
        if self.pos < len(self.data) and self.data[self.pos] == ord("."):
            self.pos += 1
            if (byte := self._peek()) not in _DIGITS:
                raise self._fail(byte, "after decimal point in numeric literal")
            self._digits()
        if self.pos < len(self.data) and self.data[self.pos] in b"eE":
            self.pos += 1
            if self._peek() in b"+-":
                self.pos += 1
            if (byte := self._peek()) not in _DIGITS:
                raise self._fail(byte, "in exponent of numeric literal")
            self._digits()

    def _literal(self, word: bytes) -> None:
        self.pos += 1
        for expected in word[1:]:
            if (byte := self._peek()) != expected:
                raise self._fail(
                    byte, f"in literal {word.decode()} (expecting {quote_byte(expected)})"
                )
            self.pos += 1


def first_value_end(data: bytes) -> int:
    """Where the first JSON value in `data` ends; raises JSONSyntaxError like Go would."""
    scanner = _Scanner(data)
    try:
        scanner.value()
    except RecursionError:
        raise JSONSyntaxError("exceeded max depth") from None
    return scanner.pos

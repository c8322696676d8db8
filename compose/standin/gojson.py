"""JSON the way Ollama's Go server writes and reads it.

Writing: `encoding/json` escapes `<`, `>`, `&`, U+2028 and U+2029 inside strings, and
prints times as RFC 3339 with nanoseconds. msgspec does the encoding; the escapes are
applied to its output, which is safe because those bytes can only occur inside strings.

Reading: gin binds with one `Decoder.Decode` into a Go struct. `bind` reproduces what a
client can observe: only the first JSON value counts, invalid UTF-8 becomes U+FFFD, keys
match fields exactly or else case-insensitively with Go's folding (last duplicate wins),
unknown keys are dropped, and errors carry Go's messages (`unexpected EOF`, `invalid
character 'x' looking for beginning of value`, `json: cannot unmarshal string into Go
struct field GenerateRequest.stream of type bool`).
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Mapping
from typing import Any, Final

import msgspec

from compose.standin.goscan import JSONSyntaxError, first_value_end, quote_rune

__all__ = [
    "ANY",
    "BOOL",
    "FLOAT32",
    "FLOAT64",
    "INT",
    "MAP",
    "STRING",
    "BindError",
    "GoType",
    "array",
    "bind",
    "encode",
    "escape_html",
    "go_duration_seconds",
    "go_quote",
    "go_time",
    "json_kind",
    "struct",
]

_ENCODER: Final = msgspec.json.Encoder()
_DECODER: Final = msgspec.json.Decoder()


def escape_html(data: bytes) -> bytes:
    """Apply Go's HTML-safe escapes to encoded JSON."""
    return (
        data.replace(b"<", b"\\u003c")
        .replace(b">", b"\\u003e")
        .replace(b"&", b"\\u0026")
        .replace(b"\xe2\x80\xa8", b"\\u2028")
        .replace(b"\xe2\x80\xa9", b"\\u2029")
    )


def encode(value: Any) -> bytes:
    """`json.Marshal(value)`: compact, HTML-escaped."""
    return escape_html(_ENCODER.encode(value))


_second_cache: list[Any] = [-1, ""]


def go_time(ns: int | None = None) -> str:
    """A UTC time (default: now) as Go's `time.Time` marshals it: trailing zeros trimmed."""
    if ns is None:
        ns = time.time_ns()
    seconds, fraction = divmod(ns, 1_000_000_000)
    if _second_cache[0] != seconds:
        _second_cache[:] = [seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))]
    digits = f"{fraction:09d}".rstrip("0")
    return f"{_second_cache[1]}.{digits}Z" if digits else f"{_second_cache[1]}Z"


def go_quote(text: str) -> str:
    """`strconv.Quote` / `%q`, as used in Ollama's capability errors."""
    return '"' + "".join(quote_rune(ch, in_char_literal=False) for ch in text) + '"'


def json_kind(value: Any) -> str:
    """The JSON kind name Go uses in UnmarshalTypeError."""
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, list):
        return "array"
    return "object"


class BindError(Exception):
    """The body did not bind; `str()` is Go's message. `empty` marks io.EOF (no body)."""

    def __init__(self, message: str, *, empty: bool = False) -> None:
        super().__init__(message)
        self.empty = empty


# --- binding -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class GoType:
    """Enough of a Go type to bind JSON into it and word errors as Go does."""

    name: str  # as reflect prints it: "bool", "[]api.Message", "map[string]interface {}"
    kind: str  # string | bool | int | float | map | array | struct | any
    elem: GoType | None = None
    fields: Mapping[str, GoType] = dataclasses.field(default_factory=dict)
    #: Folded JSON key -> field name, for Go's case-insensitive match.
    folded: Mapping[str, str] = dataclasses.field(default_factory=dict)


STRING: Final = GoType("string", "string")
BOOL: Final = GoType("bool", "bool")
INT: Final = GoType("int", "int")
FLOAT64: Final = GoType("float64", "float")
FLOAT32: Final = GoType("float32", "float")
MAP: Final = GoType("map[string]interface {}", "map")
ANY: Final = GoType("interface {}", "any")


def array(elem: GoType, name: str | None = None) -> GoType:
    """A Go slice of `elem`."""
    return GoType(name or f"[]{elem.name}", "array", elem=elem)


def struct(name: str, fields: Mapping[str, GoType]) -> GoType:
    """A Go struct `name` (package-qualified, e.g. `api.Message`) with these JSON fields."""
    return GoType(name, "struct", fields=dict(fields), folded={_fold(key): key for key in fields})


def _fold(key: str) -> str:
    # Go folds the long s (U+017F) to s and the Kelvin sign to k; other non-ASCII never matches.
    return key.replace("\u017f", "s").replace("\u212a", "k").lower()


@dataclasses.dataclass(slots=True)
class _Path:
    struct: str
    fields: list[str]


def _check(value: Any, gotype: GoType, path: _Path) -> Any:
    if value is None or gotype.kind == "any":
        return value
    kind = gotype.kind
    ok = (
        (kind == "string" and isinstance(value, str))
        or (kind == "bool" and isinstance(value, bool))
        or (kind == "int" and isinstance(value, int) and not isinstance(value, bool))
        or (kind == "float" and isinstance(value, int | float) and not isinstance(value, bool))
        or (kind == "map" and isinstance(value, dict))
        or (kind == "array" and isinstance(value, list))
        or (kind == "struct" and isinstance(value, dict))
    )
    if not ok:
        found = json_kind(value)
        if kind == "int" and isinstance(value, float):
            found = f"number {value!r}"
        where = ".".join([path.struct.rpartition(".")[2], *path.fields])
        raise BindError(
            f"json: cannot unmarshal {found} into Go struct field {where} of type {gotype.name}"
        )
    if kind == "array":
        assert gotype.elem is not None
        return [_check(item, gotype.elem, path) for item in value]
    if kind == "struct":
        return _bind_struct(value, gotype, path)
    return value


def _bind_struct(obj: dict[str, Any], gotype: GoType, path: _Path) -> dict[str, Any]:
    bound: dict[str, Any] = {}
    outer = path.struct
    for key, value in obj.items():
        name = key if key in gotype.fields else gotype.folded.get(_fold(key))
        if name is None:
            continue  # unknown keys are ignored
        path.struct = gotype.name
        path.fields.append(name)
        bound[name] = _check(value, gotype.fields[name], path)
        path.fields.pop()
        path.struct = outer
    return bound


def bind(body: bytes, gotype: GoType) -> dict[str, Any]:
    """`c.ShouldBindJSON(&req)` for a struct `gotype`; raises BindError with Go's message."""
    if not body.strip(b" \t\r\n"):
        raise BindError("EOF", empty=True)
    try:
        value = _DECODER.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError):
        # Go reads only the first value and tolerates bad UTF-8; find out what it would do.
        try:
            end = first_value_end(body)
        except JSONSyntaxError as exc:
            raise BindError(str(exc)) from None
        try:
            value = _DECODER.decode(body[:end].decode("utf-8", "replace"))
        except msgspec.DecodeError as exc:
            raise BindError(str(exc)) from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BindError(
            f"json: cannot unmarshal {json_kind(value)} into Go value of type {gotype.name}"
        )
    return _bind_struct(value, gotype, _Path(gotype.name, []))


# --- durations (keep_alive) ------------------------------------------------------------------

_UNITS: Final = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART: Final = re.compile(r"([0-9]*(?:\.[0-9]*)?)([^0-9.]*)")


def _parse_duration(text: str) -> float:
    original = text
    sign = -1.0 if text.startswith("-") else 1.0
    if text.startswith(("-", "+")):
        text = text[1:]
    if text == "0":
        return 0.0
    if not text:
        raise BindError(f"time: invalid duration {go_quote(original)}")
    total, pos = 0.0, 0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        assert match is not None
        number, unit = match.groups()
        if number in ("", "."):
            raise BindError(f"time: invalid duration {go_quote(original)}")
        if not unit:
            raise BindError(f"time: missing unit in duration {go_quote(original)}")
        if unit not in _UNITS:
            raise BindError(f"time: unknown unit {go_quote(unit)} in duration {go_quote(original)}")
        total += float(number) * _UNITS[unit]
        pos = match.end()
    return sign * total


def go_duration_seconds(value: Any) -> float | None:
    """Ollama's `keep_alive`: seconds, or a Go duration string; None when absent.

    Negative means "forever" and is returned as `math.inf`.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        go_name = {"bool": "bool", "array": "[]interface {}", "object": "map[string]interface {}"}
        raise BindError(f"Unsupported type: '{go_name[json_kind(value)]}'")
    seconds = _parse_duration(value) if isinstance(value, str) else float(value)
    return float("inf") if seconds < 0 else seconds

"""Field checks shared by every message parser: JSON limits, text, finite numbers."""

from __future__ import annotations

import json
import math
from typing import Any, Literal, overload

from gridfl._exceptions import InvalidRequestError


def _obj(data: Any, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise InvalidRequestError(f"{what}: expected a JSON object, got {type(data).__name__}")
    return data


def check_text(value: str, what: str) -> str:
    """Refuse text no database can store: NUL characters and lone UTF-16 surrogates."""
    if "\x00" in value:
        raise InvalidRequestError(f"{what} must not contain control character NUL")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError(f"{what} is not valid Unicode (a lone surrogate)") from None
    return value


#: most JSON values (objects, arrays and their members) one worker message may hold: a
#: report is a handful of fields and one long base64 string, so anything near this is
#: hostile, and refusing it before decoding keeps the parser's work linear in the bytes
#: with the constant of a normal report (64 MiB of ``[0,0,...]`` is 32M Python objects)
MAX_MESSAGE_VALUES = 4096


def parse_json(
    body: bytes | str, what: str = "the body", *, max_values: int | None = None, check: bool = True
) -> Any:
    """Decode JSON that the node can store and send back as JSON: every failure is an
    :class:`InvalidRequestError` naming what was wrong (bad UTF-8, syntax, nesting deeper
    than the decoder recurses, ``NaN``/``Infinity`` or a number beyond the float range,
    text no database stores; see :func:`check_json_values`).

    ``max_values`` caps the JSON values (a cheap count of ``,``, ``[``, ``{`` before
    decoding, an over-count since it also sees them inside strings). ``check=False``
    leaves the values to the caller (:func:`parse_ws_frame` checks a frame's).

        >>> parse_json('{"lr": 0.1}')
        {'lr': 0.1}
        >>> parse_json('{"lr": 1e999}')  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        gridfl._exceptions.InvalidRequestError: 'lr' is not a finite number ...
    """
    if max_values is not None:
        # counted on the text or the bytes as they came: no copy of a 9 MB report
        if isinstance(body, str):
            count = body.count(",") + body.count("[") + body.count("{")
        else:
            count = body.count(b",") + body.count(b"[") + body.count(b"{")
        if count > max_values:
            raise InvalidRequestError(
                f"{what} holds more than {max_values} JSON values; a worker message has a "
                "few fields and carries its diff as one base64 string"
            )
    try:
        # float("1e999") is inf and the decoder takes NaN and Infinity: both are left as
        # they come and found, with their path, by check_json_values
        value = json.loads(body)
    except RecursionError:
        raise InvalidRequestError(f"{what} is not valid JSON: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, too many digits
        raise InvalidRequestError(f"{what} is not valid JSON: {e}") from None
    return check_json_values(value) if check else value


def check_json_values(value: Any, where: str = "") -> Any:
    """Refuse, naming the field, what JSON cannot carry back out or a database cannot
    store: a non-finite float (``NaN``, ``Infinity``, ``1e999``), an integer beyond the
    float range (JavaScript reads it as ``Infinity``), and text holding NUL or a lone
    UTF-16 surrogate, in any key or value at any depth. Returns ``value``.

        >>> check_json_values({"a": [1, 2.5, "x"]})
        {'a': [1, 2.5, 'x']}
    """
    stack = [(value, where)]
    while stack:
        v, path = stack.pop()
        if isinstance(v, str):
            _check_json_text(v, path)
        elif isinstance(v, dict):
            for k, item in v.items():
                if not isinstance(k, str):
                    raise InvalidRequestError(f"{_name(path)}: keys must be strings")
                inner = f"{path}.{_segment(k)}" if path else _segment(k)
                _check_json_text(k, inner, key=True)
                stack.append((item, inner))
        elif isinstance(v, (list, tuple)):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(v))
        elif isinstance(v, float) and not math.isfinite(v):
            raise InvalidRequestError(
                f"{_name(path)} is not a finite number (NaN, Infinity and numbers beyond "
                "the float range cannot be sent back as JSON)"
            )
        elif isinstance(v, int) and not isinstance(v, bool) and _finite(v) is None:
            raise InvalidRequestError(f"{_name(path)} is an integer beyond the float range")
    return value


def _segment(key: str) -> str:
    """A key as it may appear in an error message: printable ASCII, escaped otherwise (a
    message must not carry the very text it refuses), and cut short."""
    if key.isascii() and key.isprintable() and len(key) <= 64:
        return key
    return ascii(key[:64])[1:-1]


def _name(path: str) -> str:
    return f"'{path}'" if path else "the value"


def _check_json_text(text: str, path: str, *, key: bool = False) -> None:
    if text.isascii() and "\x00" not in text:  # isascii is O(1), the NUL search a memchr
        return
    what = f"the key {_name(path)}" if key else _name(path)
    check_text(text, what)


@overload
def _str(data: dict, key: str, *, required: Literal[True] = ..., max_len: int = ...) -> str: ...
@overload
def _str(data: dict, key: str, *, required: bool, max_len: int = ...) -> str | None: ...
def _str(data: dict, key: str, *, required: bool = True, max_len: int = 4096) -> str | None:
    value = data.get(key)
    if value is None:
        if required:
            raise InvalidRequestError(f"'{key}' is required")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidRequestError(f"'{key}' must be a string")
    if isinstance(value, int) and abs(value) >= 1 << 63:
        raise InvalidRequestError(f"'{key}' is too long")
    value = str(value)
    if required and not value:
        raise InvalidRequestError(f"'{key}' must not be empty")
    if len(value) > max_len:
        raise InvalidRequestError(f"'{key}' is too long")
    return check_text(value, f"'{key}'")


def _finite(value: Any) -> float | None:
    """``value`` as a finite float, or None if it is not a finite JSON number (bools are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        f = float(value)  # an int beyond float range raises OverflowError
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


#: largest ``num_samples`` (2**53 - 1: exact in a double, JavaScript's safe integer)
MAX_NUM_SAMPLES = (1 << 53) - 1


def _number(data: dict, key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    f = _finite(value)
    if f is None or f < 0:
        raise InvalidRequestError(f"'{key}' needs to be a positive number")
    return f

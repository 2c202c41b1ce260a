"""Request bodies as the routes may trust them: strict JSON, shallow, valid Unicode.

Python's json module accepts more than JSON: NaN and Infinity, nesting until the interpreter's
recursion limit (a RecursionError, not a decode error), and lone UTF-16 surrogates ("\\ud800",
or their raw bytes) which become `str` values that no tokenizer or encoder downstream accepts.
Each of these is refused here with a 400 that says what and where, before any field is read.
"""

from __future__ import annotations

import json

from longctx.server.protocol import ApiError

MAX_JSON_DEPTH = 64  # far more than any OpenAI request body nests


def decode_json_body(body: bytes) -> object:
    """The decoded body; malformed JSON, NaN/Infinity and deep nesting are `invalid_json`, a
    lone surrogate in any string (or key) is `invalid_value` naming its place."""
    try:
        payload = json.loads(body, parse_constant=_no_constant)
    except RecursionError:
        raise _too_deep() from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, NaN and Infinity
        raise _invalid_json(str(e)) from None
    _check_strings(payload)
    return payload


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON value")


def _invalid_json(why: str) -> ApiError:
    return ApiError(400, f"the request body is not valid JSON: {why}", code="invalid_json")


def _too_deep() -> ApiError:
    return _invalid_json(f"arrays and objects nest deeper than {MAX_JSON_DEPTH} levels")


def _check_strings(payload: object) -> None:
    """Walk the decoded value without recursion: depth limit and surrogates in one pass."""
    stack: list[tuple[object, tuple[str, ...]]] = [(payload, ())]
    while stack:
        value, path = stack.pop()
        if len(path) > MAX_JSON_DEPTH:
            raise _too_deep()
        if isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, (*path, key))
                stack.append((item, (*path, key)))
        elif isinstance(value, list):
            stack.extend((item, (*path, str(i))) for i, item in enumerate(value))


def _check_text(text: str, path: tuple[str, ...]) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        # A key may hold the surrogate too: the name must still encode.
        param = ".".join(p.encode("utf-8", "backslashreplace").decode() for p in path) or None
        where = f"{param}: " if param else ""
        raise ApiError(
            400,
            f"{where}the text holds a lone UTF-16 surrogate ({text[e.start]!a}) at character "
            f"{e.start}; send valid Unicode (a surrogate must be half of a pair)",
            param=param,
            code="invalid_value",
        ) from None

"""JSON in and out: orjson when the layer ships it, the standard library otherwise.

Nesting depth is bounded before parsing, so no request can drive a parser or
anything after it into deep recursion.
"""

import json

import numpy as np

from .errors import InvalidInput

try:
    import orjson
except ImportError:  # the layer may leave it out; everything still works, slower
    orjson = None  # type: ignore[assignment]

MAX_JSON_DEPTH = 64

_STRUCTURE_ONLY = bytes(c for c in range(256) if c not in b'[]{}"')
_DEPTH_STEP = np.zeros(256, np.int64)
_DEPTH_STEP[list(b"[{")] = 1
_DEPTH_STEP[list(b"]}")] = -1


def _structure(body: bytes) -> bytes:
    """Only the brackets and quotes that decide nesting, in order."""
    if b"\\" in body:  # escaped quotes and backslashes must not toggle string state
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    return body.translate(None, _STRUCTURE_ONLY)


def _depth(structure: bytes) -> int:
    """Deepest nesting of arrays and objects, ignoring brackets inside strings."""
    if not structure:
        return 0
    chars = np.frombuffer(structure, np.uint8)
    quotes = chars == ord('"')
    outside_strings = (np.cumsum(quotes) - quotes) % 2 == 0
    steps = np.where(outside_strings & ~quotes, _DEPTH_STEP[chars], 0)
    return int(np.cumsum(steps).max())


def _finite_only(token: str):
    raise ValueError(f"{token} is not a JSON number")


def loads(body: bytes, what: str = "request body", non_finite: bool = False):
    """Parse a request. `non_finite` also takes the NaN, Infinity and -Infinity tokens (TF Serving's JSON does);
    orjson refuses them, so such a body is parsed again by the standard library."""
    structure = _structure(body)
    if len(structure) > MAX_JSON_DEPTH:  # too few brackets and quotes to nest past the bound
        depth = _depth(structure)
        if depth > MAX_JSON_DEPTH:
            raise InvalidInput(f"{what} nests JSON {depth} levels deep; the limit is {MAX_JSON_DEPTH}")
    try:
        if orjson is None:
            return json.loads(body, parse_constant=None if non_finite else _finite_only)
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as error:
            if not non_finite:
                raise
            refused = error
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise refused from None  # orjson's words, as for every other body
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{what} is not valid JSON: {exc}") from None


def _plain(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def dumps(value, non_finite: bool = False) -> bytes:
    """Encode, with numpy arrays written straight from their buffers where possible. orjson writes NaN and the
    infinities as null; `non_finite` writes them as the NaN, Infinity and -Infinity tokens instead."""
    if orjson is not None and not non_finite:
        return orjson.dumps(value, default=_plain, option=orjson.OPT_SERIALIZE_NUMPY)
    return json.dumps(value, default=_plain, separators=(",", ":")).encode()

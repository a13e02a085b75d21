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
    orjson = None

MAX_JSON_DEPTH = 64

_STRUCTURE_ONLY = bytes(c for c in range(256) if c not in b'[]{}"')
_DEPTH_STEP = np.zeros(256, np.int64)
_DEPTH_STEP[list(b"[{")] = 1
_DEPTH_STEP[list(b"]}")] = -1


def max_depth(body: bytes) -> int:
    """Deepest nesting of arrays and objects, ignoring brackets inside strings."""
    if b"\\" in body:  # escaped quotes and backslashes must not toggle string state
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    structure = np.frombuffer(body.translate(None, _STRUCTURE_ONLY), np.uint8)
    if structure.size == 0:
        return 0
    quotes = structure == ord('"')
    outside_strings = (np.cumsum(quotes) - quotes) % 2 == 0
    steps = np.where(outside_strings & ~quotes, _DEPTH_STEP[structure], 0)
    return int(np.cumsum(steps).max())


def loads(body: bytes, what: str = "request body"):
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH:  # fewer brackets cannot nest too deep
        depth = max_depth(body)
        if depth > MAX_JSON_DEPTH:
            raise InvalidInput(f"{what} nests JSON {depth} levels deep; the limit is {MAX_JSON_DEPTH}")
    try:
        if orjson is not None:
            return orjson.loads(body)
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{what} is not valid JSON: {exc}") from None


def _plain(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def dumps(value) -> bytes:
    """Encode, with numpy arrays written straight from their buffers where possible."""
    if orjson is not None:
        return orjson.dumps(value, default=_plain, option=orjson.OPT_SERIALIZE_NUMPY)
    return json.dumps(value, default=_plain, separators=(",", ":")).encode()

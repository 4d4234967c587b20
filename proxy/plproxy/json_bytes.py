"""JSON encoding whose memory stays near the size of its output, for values that may be large.

orjson is fast, but before it writes a string it reserves room for the worst case of escaping it: one
16 MiB string (a base64 image in a prompt, a long answer) costs about 250 MiB while it is encoded, a
24 MiB one nearly 400 MiB. A value holding a string longer than `LARGE_STRING` is therefore encoded by
the standard library, which needs about twice its output. So is a value nested deeper than the 255
levels orjson accepts (a JSON body parsed with orjson may be nested 1024 deep). Everything else, which
is nearly everything, goes through orjson. Pure: no I/O.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

LARGE_STRING = 1024 * 1024  # characters


def dumps(value: Any, *, size_hint: int | None = None) -> bytes:
    """`value` as compact UTF-8 JSON. `size_hint`, when known, bounds the length of its strings (the size
    of the JSON it was parsed from, say): at or under `LARGE_STRING` it spares the search for a long one.
    Raises TypeError or ValueError (not UTF-8, NaN, a type JSON lacks) like orjson."""
    if (size_hint is None or size_hint > LARGE_STRING) and has_large_string(value):
        return _standard(value)
    try:
        return orjson.dumps(value)
    except TypeError as exc:
        if "Recursion limit" not in str(exc):
            raise
        return _standard(value)


def has_large_string(value: Any) -> bool:
    """Whether a string (or a key) anywhere in `value` is longer than `LARGE_STRING`."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if len(item) > LARGE_STRING:
                return True
        elif isinstance(item, dict):
            for key, inner in item.items():
                if isinstance(key, str) and len(key) > LARGE_STRING:
                    return True
                stack.append(inner)
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return False


def _standard(value: Any) -> bytes:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.encode("utf-8")  # lone surrogates raise here, as orjson would

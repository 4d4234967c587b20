"""Parsing of the `X-PL-*` request headers into one typed value, with a warning for each malformed part.

Pure: no I/O. A malformed value never fails the call; it is ignored and named in a warning that the
proxy returns as `X-PL-Warning`. Warnings never echo the client's value back (it could hold anything,
CR/LF included): they name the header and say what was ignored and why.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from plproxy.record import Annotations

PREFIX = "x-pl-"
MAX_TAGS = 100
MAX_TAG_CHARS = 512
MAX_METADATA_KEY_CHARS = 1024
MAX_METADATA_VALUE_CHARS = 8192

_LOG_OFF = frozenset({"off", "false", "0", "no"})
_LOG_ON = frozenset({"on", "true", "1", "yes"})
# Headers that belong to plproxy itself but are not annotations; parsed elsewhere, never warned about.
_PLPROXY_CONTROL = frozenset({"x-pl-proxy-auth"})


@dataclass(frozen=True, slots=True)
class PLHeaders:
    annotations: Annotations = field(default_factory=Annotations)
    log_enabled: bool = True
    api_key: str | None = field(default=None, repr=False)
    warnings: tuple[str, ...] = ()


def is_pl_header(name: str) -> bool:
    return name[:5].lower() == PREFIX


def parse_pl_headers(headers: Iterable[tuple[str, str]]) -> PLHeaders:
    """Parse every `X-PL-*` header among `headers` (name, value pairs; other headers are skipped)."""
    values: dict[str, list[str]] = {}
    for name, value in headers:
        lowered = name.lower()
        if lowered.startswith(PREFIX):
            values.setdefault(lowered, []).append(value)
    if not values:
        return _EMPTY
    return _Parser(values).parse()


_EMPTY = PLHeaders()


class _Parser:
    def __init__(self, values: dict[str, list[str]]) -> None:
        self.values = values
        self.warnings: list[str] = []

    def warn(self, header: str, why: str) -> None:
        self.warnings.append(f"{_display(header)}: {why}")

    def single(self, header: str) -> str | None:
        found = self.values.pop(header, None)
        if not found:
            return None
        if len(found) > 1:
            self.warn(header, "sent more than once; only the first value was used")
        return found[0].strip()

    def parse(self) -> PLHeaders:
        self.drop_undecodable()
        tags = self.tags()
        metadata = self.metadata()
        prompt = self.prompt()
        score = self.integer("x-pl-score", 0, 100)
        group_id = self.integer("x-pl-group-id", 1, 2**63 - 1)
        log_enabled = self.log_switch()
        api_key = self.api_key()
        for header in sorted(self.values):
            if header not in _PLPROXY_CONTROL:
                self.warn(header, "unknown X-PL- header; it was removed and ignored")
        annotations = Annotations(tags=tags, metadata=metadata, score=score, group_id=group_id, **prompt)
        return PLHeaders(annotations, log_enabled, api_key, tuple(self.warnings))

    def drop_undecodable(self) -> None:
        """Values that were not UTF-8 on the wire (aiohttp keeps such bytes as lone surrogates): kept, they
        would make the record impossible to encode, and with it the rest of the annotations."""
        for header, found in list(self.values.items()):
            valid = [value for value in found if _is_text(value)]
            if len(valid) == len(found) or header in _PLPROXY_CONTROL:
                continue
            self.warn(header, "is not valid UTF-8; ignored")
            if valid:
                self.values[header] = valid
            else:
                del self.values[header]

    def tags(self) -> tuple[str, ...]:
        raw_values = self.values.pop("x-pl-tags", [])
        tags: list[str] = []
        for raw in raw_values:
            raw = raw.strip()
            if raw.startswith("["):
                try:
                    parsed = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    self.warn("x-pl-tags", "starts with '[' but is not a JSON array; ignored")
                    continue
                if not isinstance(parsed, list):
                    self.warn("x-pl-tags", "is not a JSON array of strings; ignored")
                    continue
                items = [item for item in parsed if isinstance(item, str)]
                if len(items) != len(parsed):
                    self.warn("x-pl-tags", "items that are not strings were ignored")
            else:
                items = raw.split(",")
            tags.extend(item.strip() for item in items if item.strip())
        unique = list(dict.fromkeys(tags))
        if any(len(tag) > MAX_TAG_CHARS for tag in unique):
            self.warn("x-pl-tags", f"tags longer than {MAX_TAG_CHARS} characters were ignored")
            unique = [tag for tag in unique if len(tag) <= MAX_TAG_CHARS]
        if len(unique) > MAX_TAGS:
            self.warn("x-pl-tags", f"more than {MAX_TAGS} tags; the rest were ignored")
            unique = unique[:MAX_TAGS]
        return tuple(unique)

    def json_object(self, header: str) -> dict[str, Any] | None:
        raw = self.single(header)
        if raw is None:
            return None
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self.warn(header, "is not valid JSON; ignored")
            return None
        if not isinstance(parsed, dict):
            self.warn(header, "is not a JSON object; ignored")
            return None
        return parsed

    def metadata(self) -> dict[str, str]:
        parsed = self.json_object("x-pl-metadata")
        if not parsed:
            return {}
        metadata: dict[str, str] = {}
        dropped = False
        for key, value in parsed.items():
            text = value if isinstance(value, str) else orjson.dumps(value).decode()
            if len(key) > MAX_METADATA_KEY_CHARS or len(text) > MAX_METADATA_VALUE_CHARS:
                dropped = True
                continue
            metadata[key] = text
        if dropped:
            self.warn(
                "x-pl-metadata",
                f"entries with keys over {MAX_METADATA_KEY_CHARS} or values over "
                f"{MAX_METADATA_VALUE_CHARS} characters were ignored",
            )
        return metadata

    def prompt(self) -> dict[str, Any]:
        name = self.single("x-pl-prompt-name")
        version = self.integer("x-pl-prompt-version", 1, 2**31 - 1)
        label = self.single("x-pl-prompt-label")
        variables = self.json_object("x-pl-prompt-input-variables")
        if not name:
            for header, given in (
                ("x-pl-prompt-version", version is not None),
                ("x-pl-prompt-label", bool(label)),
                ("x-pl-prompt-input-variables", variables is not None),
            ):
                if given:
                    self.warn(header, "needs X-PL-Prompt-Name; ignored")
            return {}
        if version is not None and label:
            self.warn("x-pl-prompt-label", "X-PL-Prompt-Version is also set; the label was ignored")
            label = None
        return {
            "prompt_name": name,
            "prompt_version_number": version,
            "prompt_label": label or None,
            "prompt_input_variables": variables or {},
        }

    def integer(self, header: str, low: int, high: int) -> int | None:
        raw = self.single(header)
        if raw is None:
            return None
        try:
            value = int(raw, 10)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            self.warn(header, f"is not a whole number from {low} to {high}; ignored")
            return None
        return value

    def log_switch(self) -> bool:
        raw = self.single("x-pl-log")
        if raw is None:
            return True
        lowered = raw.lower()
        if lowered in _LOG_OFF:
            return False
        if lowered not in _LOG_ON:
            self.warn("x-pl-log", "is not off/false/0 or on/true/1; the call is recorded")
        return True

    def api_key(self) -> str | None:
        raw = self.single("x-pl-api-key")
        if raw is None:
            return None
        if not raw or not raw.isascii() or not raw.isprintable() or " " in raw or len(raw) > 256:
            self.warn("x-pl-api-key", "is not a key of printable ASCII characters; the default key is used")
            return None
        return raw


def _is_text(value: str) -> bool:
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _display(header: str) -> str:
    """`x-pl-prompt-name` → `X-PL-Prompt-Name`, for messages."""
    return "-".join(part.upper() if part in ("x", "pl") else part.capitalize() for part in header.split("-"))

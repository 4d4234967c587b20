"""Settings: one frozen object, read once from the environment and command-line flags, validated at once.

Every option is described once, in `OPTIONS`: its environment variable, its flag (if `serve` has one),
its default and its help text. The command line is built from that table and `Settings.from_sources`
reads the same table, so the two cannot drift apart. Every problem is reported together, one line each,
naming the variable or flag, the bad value and what would be valid.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yarl import URL


class SettingsError(Exception):
    """Raised with every problem found; `problems` holds one line per bad setting."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Route:
    """A mount point: `/<name>/<rest>` goes to `<url>/<rest>`. The default upstream is the route `v1`."""

    name: str
    url: URL


@dataclass(frozen=True, slots=True)
class Option:
    attr: str
    env: str
    default: str | None
    help: str
    parse: Callable[[str, Mapping[str, str]], Any]
    flag: str | None = None
    metavar: str | None = None
    secret: bool = False


def _http_url(raw: str, _env: Mapping[str, str]) -> URL:
    try:
        url = URL(raw.strip())
    except ValueError:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise ValueError("use an http:// or https:// URL with a host, such as https://api.openai.com/v1")
    if url.query_string or url.fragment:
        raise ValueError("use a base URL without a query string or fragment")
    return url.with_path(url.path.rstrip("/"))


def _int_between(low: int, high: int) -> Callable[[str, Mapping[str, str]], int]:
    def parse(raw: str, _env: Mapping[str, str]) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(f"use a whole number from {low} to {high}") from None
        if not low <= value <= high:
            raise ValueError(f"use a whole number from {low} to {high}")
        return value

    return parse


def _seconds(low: float, high: float) -> Callable[[str, Mapping[str, str]], float]:
    def parse(raw: str, _env: Mapping[str, str]) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError(f"use a number of seconds from {low:g} to {high:g}") from None
        if not low <= value <= high:
            raise ValueError(f"use a number of seconds from {low:g} to {high:g}")
        return value

    return parse


def _choice(*choices: str) -> Callable[[str, Mapping[str, str]], str]:
    def parse(raw: str, _env: Mapping[str, str]) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError("use one of " + ", ".join(choices))
        return value

    return parse


def _host(raw: str, _env: Mapping[str, str]) -> str:
    value = raw.strip()
    if not value or any(c.isspace() or c in "/?#" for c in value):
        raise ValueError("use an address to listen on, such as 127.0.0.1, 0.0.0.0 or ::1")
    return value


def _optional_text(raw: str, _env: Mapping[str, str]) -> str | None:
    value = raw.strip()
    return value or None


def _api_key(raw: str, _env: Mapping[str, str]) -> str | None:
    value = raw.strip()
    if not value:
        return None
    if not value.isascii() or not value.isprintable() or " " in value:
        raise ValueError("use a key of printable ASCII characters without spaces (keys look like pl_…)")
    return value


MIN_TOKEN_CHARS = 16


def _auth_tokens(raw: str, _env: Mapping[str, str]) -> tuple[str, ...]:
    return _check_tokens([token.strip() for token in raw.split(",") if token.strip()])


def _auth_tokens_file(raw: str, _env: Mapping[str, str]) -> tuple[str, ...]:
    path = raw.strip()
    if not path:
        return ()
    try:
        text = Path(os.path.expanduser(path)).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ValueError(f"it cannot be read ({reason}); use a readable file, one token a line") from None
    lines = [line.strip() for line in text.splitlines()]
    tokens = _check_tokens([line for line in lines if line and not line.startswith("#")])
    if not tokens:
        raise ValueError("it holds no token; put one token per line (lines starting with # are comments)")
    return tokens


def _check_tokens(tokens: list[str]) -> tuple[str, ...]:
    for token in tokens:
        if len(token) < MIN_TOKEN_CHARS or not token.isascii() or not token.isprintable() or " " in token:
            raise ValueError(
                f"use tokens of at least {MIN_TOKEN_CHARS} printable ASCII characters without spaces "
                "(the values are not shown)"
            )
    return tuple(tokens)


def default_data_dir(env: Mapping[str, str]) -> str:
    state_home = env.get("XDG_STATE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".local" / "state")
    return str(Path(state_home) / "plproxy")


def _data_dir(raw: str, env: Mapping[str, str]) -> Path:
    path = Path(os.path.expanduser(raw.strip() or default_data_dir(env)))
    if path.exists() and not path.is_dir():
        raise ValueError("it is an existing file; use a directory path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"it cannot be created ({exc.strerror}); use a writable directory path") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError("it is not writable; use a writable directory path")
    return path


_ROUTE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
RESERVED_ROUTE_NAMES = frozenset({"v1", "plproxy", "healthz", "readyz", "metrics"})


def _routes(raw: str, env: Mapping[str, str]) -> tuple[Route, ...]:
    routes: list[Route] = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        name, sep, url = item.partition("=")
        name = name.strip()
        if not sep or not _ROUTE_NAME.match(name) or name in RESERVED_ROUTE_NAMES:
            raise ValueError(
                f"{item!r} is not name=url; use name=url pairs separated by commas, names of lowercase "
                f"letters, digits, - and _, not one of {', '.join(sorted(RESERVED_ROUTE_NAMES))}"
            )
        if any(route.name == name for route in routes):
            raise ValueError(f"the name {name!r} is given twice; give each route once")
        try:
            routes.append(Route(name, _http_url(url, env)))
        except ValueError as exc:
            raise ValueError(f"route {name!r}: {exc}") from None
    return tuple(routes)


OPTIONS: tuple[Option, ...] = (
    Option("host", "PLPROXY_HOST", "127.0.0.1", "address to listen on", _host, "--host", "ADDR"),
    Option("port", "PLPROXY_PORT", "8788", "port to listen on", _int_between(1, 65535), "--port", "PORT"),
    Option(
        "upstream",
        "PLPROXY_UPSTREAM",
        "https://api.openai.com/v1",
        "the provider's base URL (what OPENAI_BASE_URL held before plproxy); "
        "/v1/<rest> goes to <upstream>/<rest>",
        _http_url,
        "--upstream",
        "URL",
    ),
    Option(
        "data_dir",
        "PLPROXY_DATA_DIR",
        "",
        "where the store of records lives (default: $XDG_STATE_HOME/plproxy or ~/.local/state/plproxy)",
        _data_dir,
        "--data-dir",
        "DIR",
    ),
    Option(
        "promptlayer_api_key",
        "PROMPTLAYER_API_KEY",
        "",
        "PromptLayer API key; unset means records are kept in the store",
        _api_key,
        secret=True,
    ),
    Option(
        "promptlayer_base_url",
        "PROMPTLAYER_BASE_URL",
        "https://api.promptlayer.com",
        "PromptLayer API base URL",
        _http_url,
    ),
    Option(
        "routes",
        "PLPROXY_ROUTES",
        "",
        "more upstreams as name=url,name=url: /<name>/<rest> goes to <url>/<rest>",
        _routes,
        "--routes",
        "ROUTES",
    ),
    Option(
        "stream_usage",
        "PLPROXY_STREAM_USAGE",
        "inject",
        "inject: ask the upstream for usage on chat streams and strip it from what the client receives; "
        "off: forward requests untouched",
        _choice("inject", "off"),
        "--stream-usage",
        "MODE",
    ),
    Option(
        "max_body_mb",
        "PLPROXY_MAX_BODY_MB",
        "32",
        "largest request body accepted, in MiB (image prompts are large)",
        _int_between(1, 4096),
        "--max-body-mb",
        "MB",
    ),
    Option(
        "connect_timeout",
        "PLPROXY_CONNECT_TIMEOUT",
        "10",
        "seconds to connect to an upstream",
        _seconds(0.1, 600),
        "--connect-timeout",
        "S",
    ),
    Option(
        "read_timeout",
        "PLPROXY_READ_TIMEOUT",
        "600",
        "seconds an upstream may stay silent (before headers, or between two chunks); no total limit",
        _seconds(0.1, 86400),
        "--read-timeout",
        "S",
    ),
    Option(
        "drain_timeout",
        "PLPROXY_DRAIN_TIMEOUT",
        "20",
        "on SIGTERM, seconds in-flight calls (streams included) may take to finish",
        _seconds(0, 3600),
        "--drain-timeout",
        "S",
    ),
    Option(
        "flush_timeout",
        "PLPROXY_FLUSH_TIMEOUT",
        "5",
        "on SIGTERM, seconds spent shipping pending records after the drain; the rest stay on disk",
        _seconds(0, 3600),
        "--flush-timeout",
        "S",
    ),
    Option(
        "store_max_mb",
        "PLPROXY_STORE_MAX_MB",
        "1024",
        "size cap of the store in MiB; exported payloads are pruned first",
        _int_between(1, 1048576),
        "--store-max-mb",
        "MB",
    ),
    Option(
        "export_concurrency",
        "PLPROXY_EXPORT_CONCURRENCY",
        "8",
        "PromptLayer calls in flight at once",
        _int_between(1, 256),
    ),
    Option(
        "auth_tokens",
        "PLPROXY_AUTH_TOKENS",
        "",
        "tokens callers must present (Proxy-Authorization: Bearer … or X-PL-Proxy-Auth), comma-separated; "
        "unset: no proxy authentication",
        _auth_tokens,
        secret=True,
    ),
    Option(
        "auth_tokens_file",
        "PLPROXY_AUTH_TOKENS_FILE",
        "",
        "a file with one such token per line, read at start-up",
        _auth_tokens_file,
    ),
    Option(
        "workers",
        "PLPROXY_WORKERS",
        "1",
        "processes serving the same port",
        _int_between(1, 64),
        "--workers",
        "N",
    ),
    Option(
        "log_level",
        "PLPROXY_LOG_LEVEL",
        "info",
        "operational log level",
        _choice("debug", "info", "warning", "error"),
        "--log-level",
        "LEVEL",
    ),
    Option(
        "log_format",
        "PLPROXY_LOG_FORMAT",
        "json",
        "operational log format",
        _choice("json", "text"),
        "--log-format",
        "FMT",
    ),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8788
    upstream: URL = URL("https://api.openai.com/v1")  # noqa: RUF009 - yarl URLs are immutable
    data_dir: Path
    promptlayer_api_key: str | None = field(default=None, repr=False)
    promptlayer_base_url: URL = URL("https://api.promptlayer.com")  # noqa: RUF009
    routes: tuple[Route, ...] = ()
    stream_usage: str = "inject"
    max_body_mb: int = 32
    connect_timeout: float = 10.0
    read_timeout: float = 600.0
    drain_timeout: float = 20.0
    flush_timeout: float = 5.0
    store_max_mb: int = 1024
    export_concurrency: int = 8
    auth_tokens: tuple[str, ...] = field(default=(), repr=False)
    auth_tokens_file: tuple[str, ...] = field(default=(), repr=False)  # the tokens read from that file
    workers: int = 1
    log_level: str = "info"
    log_format: str = "json"

    @classmethod
    def from_sources(cls, env: Mapping[str, str], flags: Mapping[str, str | None] | None = None) -> Settings:
        """Build settings from an environment mapping and flag values (flags win). Raises SettingsError."""
        flags = flags or {}
        values: dict[str, Any] = {}
        problems: list[str] = []
        for option in OPTIONS:
            flag_value = flags.get(option.attr)
            if flag_value is not None:
                raw, source = flag_value, option.flag or option.env
            elif option.env in env:
                raw, source = env[option.env], option.env
            else:
                raw, source = option.default or "", f"the default of {option.env}"
            try:
                values[option.attr] = option.parse(raw, env)
            except ValueError as exc:
                shown = "<hidden>" if option.secret else repr(raw)
                problems.append(f"{source}={shown}: {exc}")
        if problems:
            raise SettingsError(problems)
        return cls(**values)

    @property
    def all_routes(self) -> tuple[Route, ...]:
        """The default upstream as the route `v1`, then the named routes."""
        return (Route("v1", self.upstream), *self.routes)

    @property
    def proxy_tokens(self) -> tuple[str, ...]:
        """Every token that opens the proxy, from the variable and the file."""
        return self.auth_tokens + self.auth_tokens_file

    @property
    def max_body_bytes(self) -> int:
        return self.max_body_mb * 1024 * 1024

    @property
    def store_path(self) -> Path:
        return self.data_dir / "plproxy.db"

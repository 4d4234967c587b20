"""The `plproxy` command: `serve`, `logs` and `flush`.

Settings problems end the program with one line per problem and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

from plproxy import __version__
from plproxy.settings import OPTIONS, Settings, SettingsError

EXIT_SETTINGS = 2


def _settings_help(option_env: str, default: str | None, text: str) -> str:
    shown = default if default else "unset"
    return f"{text} [env {option_env}; default: {shown}]"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plproxy",
        description="An OpenAI-compatible logging reverse proxy: every call goes to the provider untouched, "
        "and a record of it goes to PromptLayer in the background.",
        epilog="Settings are read from the environment; flags override them. "
        "See `plproxy serve --help` for the full list.",
    )
    parser.add_argument("--version", action="version", version=f"plproxy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the proxy",
        description="Run the proxy. Point clients at http://HOST:PORT/v1 (OPENAI_BASE_URL).",
        epilog="Environment only: "
        + "; ".join(
            f"{option.env} ({option.help}; default: {option.default or 'unset'})"
            for option in OPTIONS
            if option.flag is None
        ),
    )
    for option in OPTIONS:
        if option.flag is not None:
            serve.add_argument(
                option.flag,
                dest=option.attr,
                metavar=option.metavar,
                help=_settings_help(option.env, option.default, option.help),
            )

    # internal: set by `--workers N` on the processes it starts
    serve.add_argument("--worker-of", dest="worker_of", type=int, help=argparse.SUPPRESS)

    logs = commands.add_parser(
        "logs",
        help="list recent records from the local store",
        description="List recent records, newest first.",
    )
    _data_dir_flag(logs)
    logs.add_argument(
        "--json", action="store_true", help="one JSON object per line, with the full log id and payload"
    )
    logs.add_argument(
        "--follow", "-f", action="store_true", help="keep printing new records as they are stored"
    )
    logs.add_argument(
        "--limit", "-n", type=_positive_int, default=20, metavar="N", help="the newest N (default 20)"
    )

    flush = commands.add_parser(
        "flush",
        help="ship pending (and, with a key, kept) records to PromptLayer now",
        description="Ship every pending record now, and every kept one when PROMPTLAYER_API_KEY is set; "
        "say what happened. Works beside a running or a crashed `serve`.",
    )
    _data_dir_flag(flush)
    flush.add_argument(
        "--timeout", type=float, default=60.0, metavar="S", help="give up after S seconds (default 60)"
    )
    return parser


def _data_dir_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        dest="data_dir",
        metavar="DIR",
        help="the store's directory [env PLPROXY_DATA_DIR; default: $XDG_STATE_HOME/plproxy "
        "or ~/.local/state/plproxy]",
    )


def _positive_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError("use a whole number from 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError("use a whole number from 1")
    return value


def load_settings(args: argparse.Namespace, env: Mapping[str, str]) -> Settings:
    flags = {option.attr: getattr(args, option.attr, None) for option in OPTIONS}
    return Settings.from_sources(env, flags)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    env = os.environ if env is None else env
    if args.command is None:
        parser.print_help()
        return EXIT_SETTINGS
    try:
        settings = load_settings(args, env)
    except SettingsError as error:
        for problem in error.problems:
            print(f"plproxy: {problem}", file=sys.stderr)
        return EXIT_SETTINGS
    if args.command == "serve":
        from plproxy.serve import serve

        serve_args = [arg for arg in (argv if argv is not None else sys.argv[1:])][1:]
        return serve(
            settings,
            serve_args=serve_args,
            worker_of=args.worker_of,
            multiprocess_dir=env.get("PROMETHEUS_MULTIPROC_DIR") if args.worker_of else None,
        )
    if args.command == "logs":
        from plproxy.logs_command import run_logs

        return run_logs(settings, as_json=args.json, follow=args.follow, limit=args.limit)
    from plproxy.logs_command import run_flush

    return run_flush(settings, timeout=args.timeout)

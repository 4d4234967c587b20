"""Settings: every problem reported at once, naming the setting, the value and what is valid."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from yarl import URL

from plproxy.settings import Route, Settings, SettingsError, default_data_dir
from tests.proxy_fixtures import plproxy_command


def env_for(tmp_path: Path, **values: str) -> dict[str, str]:
    return {"HOME": str(tmp_path), **values}


def test_embedded_defaults(tmp_path: Path) -> None:
    settings = Settings.from_sources(env_for(tmp_path))
    assert settings.host == "127.0.0.1"
    assert settings.port == 8788
    assert settings.upstream == URL("https://api.openai.com/v1")
    assert settings.data_dir == tmp_path / ".local" / "state" / "plproxy"
    assert settings.data_dir.is_dir()
    assert settings.promptlayer_api_key is None
    assert settings.promptlayer_base_url == URL("https://api.promptlayer.com")
    assert settings.stream_usage == "inject"
    assert settings.max_body_mb == 32


def test_xdg_state_home_is_honoured(tmp_path: Path) -> None:
    assert default_data_dir({"XDG_STATE_HOME": str(tmp_path / "st")}) == str(tmp_path / "st" / "plproxy")


def test_flags_override_environment(tmp_path: Path) -> None:
    settings = Settings.from_sources(env_for(tmp_path, PLPROXY_PORT="9000"), {"port": "9100"})
    assert settings.port == 9100


def test_trailing_slashes_are_stripped(tmp_path: Path) -> None:
    settings = Settings.from_sources(
        env_for(
            tmp_path, PLPROXY_UPSTREAM="http://127.0.0.1:1/v1/", PROMPTLAYER_BASE_URL="http://127.0.0.1:2/"
        )
    )
    assert str(settings.upstream) == "http://127.0.0.1:1/v1"
    assert str(settings.promptlayer_base_url) == "http://127.0.0.1:2"


def test_routes_parse(tmp_path: Path) -> None:
    settings = Settings.from_sources(
        env_for(
            tmp_path, PLPROXY_ROUTES="anthropic=https://api.anthropic.com, local=http://127.0.0.1:8080/v1"
        )
    )
    assert settings.routes == (
        Route("anthropic", URL("https://api.anthropic.com")),
        Route("local", URL("http://127.0.0.1:8080/v1")),
    )
    assert [route.name for route in settings.all_routes] == ["v1", "anthropic", "local"]


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("PLPROXY_PORT", "abc", "PLPROXY_PORT='abc': use a whole number from 1 to 65535"),
        ("PLPROXY_PORT", "0", "PLPROXY_PORT='0': use a whole number from 1 to 65535"),
        ("PLPROXY_PORT", "70000", "PLPROXY_PORT='70000'"),
        ("PLPROXY_UPSTREAM", "ftp://x", "PLPROXY_UPSTREAM='ftp://x': use an http:// or https:// URL"),
        ("PLPROXY_UPSTREAM", "api.openai.com", "PLPROXY_UPSTREAM='api.openai.com'"),
        ("PROMPTLAYER_BASE_URL", "nope", "PROMPTLAYER_BASE_URL='nope'"),
        ("PLPROXY_STREAM_USAGE", "maybe", "PLPROXY_STREAM_USAGE='maybe': use one of inject, off"),
        ("PLPROXY_ROUTES", "justaname", "PLPROXY_ROUTES='justaname': 'justaname' is not name=url"),
        ("PLPROXY_ROUTES", "v1=http://127.0.0.1:1", "not one of"),
        ("PLPROXY_ROUTES", "a=http://x,a=http://y", "given twice"),
        ("PLPROXY_ROUTES", "a=ftp://x", "route 'a'"),
        ("PLPROXY_MAX_BODY_MB", "-1", "PLPROXY_MAX_BODY_MB='-1'"),
        ("PLPROXY_READ_TIMEOUT", "soon", "PLPROXY_READ_TIMEOUT='soon': use a number of seconds"),
    ],
)
def test_bad_values_name_the_setting(tmp_path: Path, variable: str, value: str, expected: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_sources(env_for(tmp_path, **{variable: value}))
    assert len(caught.value.problems) == 1
    assert expected in caught.value.problems[0]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_sources(
            env_for(tmp_path, PLPROXY_PORT="x", PLPROXY_UPSTREAM="y", PLPROXY_STREAM_USAGE="z")
        )
    assert [problem.split("=")[0] for problem in caught.value.problems] == [
        "PLPROXY_PORT",
        "PLPROXY_UPSTREAM",
        "PLPROXY_STREAM_USAGE",
    ]


def test_flag_problems_name_the_flag(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_sources(env_for(tmp_path), {"port": "http"})
    assert caught.value.problems[0].startswith("--port='http'")


def test_data_dir_that_is_a_file(tmp_path: Path) -> None:
    existing = tmp_path / "afile"
    existing.write_text("x")
    with pytest.raises(SettingsError) as caught:
        Settings.from_sources(env_for(tmp_path, PLPROXY_DATA_DIR=str(existing)))
    assert "PLPROXY_DATA_DIR=" in caught.value.problems[0]
    assert "existing file" in caught.value.problems[0]


def test_data_dir_that_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(SettingsError) as caught:
        Settings.from_sources(env_for(tmp_path, PLPROXY_DATA_DIR=str(blocker / "sub")))
    assert "cannot be created" in caught.value.problems[0]


def test_api_key_value_is_never_shown(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_sources(env_for(tmp_path, PROMPTLAYER_API_KEY="pl_bad key\x01"))
    assert "pl_bad" not in str(caught.value)
    assert "PROMPTLAYER_API_KEY=<hidden>" in caught.value.problems[0]
    settings = Settings.from_sources(env_for(tmp_path, PROMPTLAYER_API_KEY="pl_secret_canary"))
    assert "pl_secret_canary" not in repr(settings)


def test_serve_with_bad_settings_exits_2_with_one_line_per_problem(tmp_path: Path) -> None:
    result = subprocess.run(
        plproxy_command("serve", "--port", "nope"),
        env={"HOME": str(tmp_path), "PLPROXY_UPSTREAM": "gopher://x", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "plproxy: --port='nope': use a whole number from 1 to 65535",
        "plproxy: PLPROXY_UPSTREAM='gopher://x': use an http:// or https:// URL with a host, "
        "such as https://api.openai.com/v1",
    ]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [["--help"], ["serve", "--help"]])
def test_help_describes_options_and_defaults(args: list[str]) -> None:
    result = subprocess.run(plproxy_command(*args), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    if args == ["serve", "--help"]:
        for text in ("--port", "default: 8788", "PLPROXY_UPSTREAM", "PROMPTLAYER_API_KEY", "--data-dir"):
            assert text in result.stdout
    else:
        for text in ("serve", "logs", "flush"):
            assert text in result.stdout

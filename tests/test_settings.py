"""Settings: source precedence, provenance, error messages and secret masking."""

from __future__ import annotations

import re
import traceback
from pathlib import Path
from typing import Any

import pytest
from isolation import clean_env  # noqa: F401  (autouse: every test here)
from pydantic import BaseModel, ConfigDict, SecretStr

from upbus.core._errors import ConfigError
from upbus.settings import (
    RateLimitSettings,
    ReconnectSettings,
    Settings,
    explain_settings,
    load_settings,
)
from upbus.settings.sources import NOT_SETTINGS

SECRET = "sk-VERY-SECRET-0123456789"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def sources(settings: Settings) -> dict[str, str]:
    return {name: source for name, _, source in explain_settings(settings)}


def config_error(**overrides: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(**overrides)
    return str(info.value)


class SqliteOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = "upbus.db"
    timeout: float = 5.0
    password: SecretStr | None = None


# --- precedence -----------------------------------------------------------------


def test_defaults(tmp_path: Path) -> None:
    settings = load_settings(_cwd=tmp_path)

    assert settings.public_url == "wss://api.upbit.com/websocket/v1"
    assert settings.private_url == "wss://api.upbit.com/websocket/v1/private"
    assert settings.access_key is None
    assert settings.jwt_algorithm == "HS512"
    assert settings.rate_limit == RateLimitSettings()
    assert settings.reconnect == ReconnectSettings()
    assert settings.disabled_plugins == []
    assert settings.plugins == {}
    assert set(sources(settings).values()) == {"default"}


def test_precedence_and_deep_merge_across_every_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(
        tmp_path / "pyproject.toml",
        """
        [project]
        name = "app"

        [tool.upbus]
        debounce = 1.0
        jwt_algorithm = "HS256"

        [tool.upbus.rate_limit]
        margin = 0.5
        max_wait = 1.0

        [tool.upbus.plugins.sqlite]
        path = "pyproject.db"
        timeout = 1
        """.replace("\n        ", "\n"),
    )
    user_file = write(
        tmp_path / "upbus.toml",
        """
        jwt_algorithm = "HS384"
        format = "SIMPLE"

        [rate_limit]
        max_wait = 2.0
        connect_per_second = 3
        """.replace("\n        ", "\n"),
    )
    monkeypatch.setenv("UPBUS_FORMAT", "JSON_LIST")
    monkeypatch.setenv("UPBUS_HEARTBEAT_INTERVAL", "20")
    monkeypatch.setenv("UPBUS_RATE_LIMIT__CONNECT_PER_SECOND", "4")
    monkeypatch.setenv("UPBUS_PLUGINS__SQLITE__PATH", "env.db")

    settings = load_settings(
        _cwd=tmp_path, heartbeat_interval=25, rate_limit={"messages_per_minute": 50}
    )

    assert settings.debounce == 1.0
    assert settings.jwt_algorithm == "HS384"
    assert settings.format == "JSON_LIST"
    assert settings.heartbeat_interval == 25
    assert settings.rate_limit == RateLimitSettings(
        margin=0.5, max_wait=2.0, connect_per_second=4, messages_per_minute=50
    )
    assert settings.plugins == {"sqlite": {"path": "env.db", "timeout": 1}}
    assert sources(settings) == dict.fromkeys(sources(settings), "default") | {
        "debounce": "pyproject.toml [tool.upbus]",
        "jwt_algorithm": str(user_file),
        "format": "environment variable UPBUS_FORMAT",
        "heartbeat_interval": "argument",
        "rate_limit.margin": "pyproject.toml [tool.upbus]",
        "rate_limit.max_wait": str(user_file),
        "rate_limit.connect_per_second": (
            "environment variable UPBUS_RATE_LIMIT__CONNECT_PER_SECOND"
        ),
        "rate_limit.messages_per_minute": "argument",
        "plugins.sqlite.path": "environment variable UPBUS_PLUGINS__SQLITE__PATH",
        "plugins.sqlite.timeout": "pyproject.toml [tool.upbus]",
    }


def test_upbus_config_replaces_local_upbus_toml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "pyproject.toml", "[tool.upbus]\ndebounce = 1.0\nheartbeat_timeout = 3\n")
    write(tmp_path / "upbus.toml", "debounce = 2.0\nformat = 'SIMPLE'\n")
    (tmp_path / "conf").mkdir()
    named = write(tmp_path / "conf" / "prod.toml", "debounce = 3.0\n")
    monkeypatch.setenv("UPBUS_CONFIG", "conf/prod.toml")  # relative to the working directory
    monkeypatch.setenv("UPBUS_HEARTBEAT_INTERVAL", "40")

    settings = load_settings(_cwd=tmp_path, jwt_algorithm="HS256")

    assert settings.debounce == 3.0
    assert settings.format == "DEFAULT"  # ./upbus.toml is not read at all
    assert settings.heartbeat_timeout == 3
    assert settings.heartbeat_interval == 40
    assert settings.jwt_algorithm == "HS256"
    assert sources(settings)["debounce"] == str(named)


def test_missing_upbus_config_file_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UPBUS_CONFIG", str(tmp_path / "nope.toml"))

    message = config_error(_cwd=tmp_path)

    assert "UPBUS_CONFIG" in message
    assert str(tmp_path / "nope.toml") in message


def test_settings_constructor_reads_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "pyproject.toml", "[tool.upbus]\ndebounce = 1.5\n")
    write(tmp_path / "upbus.toml", "heartbeat_timeout = 2.5\n")
    monkeypatch.setenv("UPBUS_FORMAT", "SIMPLE")

    settings = Settings(jwt_algorithm="HS256")

    assert (settings.debounce, settings.heartbeat_timeout) == (1.5, 2.5)
    assert (settings.format, settings.jwt_algorithm) == ("SIMPLE", "HS256")
    assert set(sources(settings).values()) == {"unknown"}


def test_pyproject_without_upbus_table_is_ignored(tmp_path: Path) -> None:
    write(tmp_path / "pyproject.toml", "[project]\nname = 'app'\n[tool.other]\nx = 1\n")

    assert load_settings(_cwd=tmp_path) == load_settings(_cwd=tmp_path / "elsewhere")


# --- lists and plugin sections --------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("sqlite,metrics", ["sqlite", "metrics"]),
        (" sqlite , metrics ,", ["sqlite", "metrics"]),
        ("sqlite", ["sqlite"]),
        ("", []),
        ('["sqlite", "metrics"]', ["sqlite", "metrics"]),
    ],
)
def test_disabled_plugins_from_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raw: str, expected: list[str]
) -> None:
    monkeypatch.setenv("UPBUS_DISABLED_PLUGINS", raw)

    assert load_settings(_cwd=tmp_path).disabled_plugins == expected


def test_disabled_plugins_from_toml_and_argument(tmp_path: Path) -> None:
    write(tmp_path / "upbus.toml", "disabled_plugins = ['a', 'b']\n")

    assert load_settings(_cwd=tmp_path).disabled_plugins == ["a", "b"]
    assert load_settings(_cwd=tmp_path, disabled_plugins=["c"]).disabled_plugins == ["c"]


def test_plugin_section_validates_with_the_plugin_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "pyproject.toml", "[tool.upbus.plugins.sqlite]\npath = 'x.db'\n")
    monkeypatch.setenv("UPBUS_PLUGINS__SQLITE__TIMEOUT", "2.5")
    settings = load_settings(_cwd=tmp_path)

    assert settings.plugin_section("sqlite", SqliteOptions) == SqliteOptions(
        path="x.db", timeout=2.5
    )
    assert settings.plugin_section("absent", SqliteOptions) == SqliteOptions()


def test_plugin_section_error_names_field_and_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    user_file = write(tmp_path / "upbus.toml", "[plugins.sqlite]\npathh = 'x.db'\n")
    monkeypatch.setenv("UPBUS_PLUGINS__SQLITE__TIMEOUT", "soon")
    settings = load_settings(_cwd=tmp_path)

    with pytest.raises(ConfigError) as info:
        settings.plugin_section("sqlite", SqliteOptions)

    assert str(info.value).splitlines() == [
        "invalid setting plugins.sqlite.timeout = 'soon' "
        "(from environment variable UPBUS_PLUGINS__SQLITE__TIMEOUT): "
        "Input should be a valid number, unable to parse string as a number",
        f"unknown setting 'plugins.sqlite.pathh' (from {user_file})",
    ]


def test_plugin_section_masks_plugin_secrets(tmp_path: Path) -> None:
    settings = load_settings(_cwd=tmp_path, plugins={"sqlite": {"password": [SECRET]}})

    with pytest.raises(ConfigError) as info:
        settings.plugin_section("sqlite", SqliteOptions)

    message = str(info.value)
    assert message.startswith("invalid setting plugins.sqlite.password = ********** ")
    assert "(from argument)" in message
    assert SECRET not in message


# --- error messages -------------------------------------------------------------


def test_error_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UPBUS_RATE_LIMIT__MAX_WAIT", "abc")

    assert config_error(_cwd=tmp_path) == (
        "invalid setting rate_limit.max_wait = 'abc' "
        "(from environment variable UPBUS_RATE_LIMIT__MAX_WAIT): "
        "Input should be a valid number, unable to parse string as a number"
    )


def test_error_from_json_environment_value_names_that_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UPBUS_RATE_LIMIT", '{"max_wait": -1}')

    assert config_error(_cwd=tmp_path) == (
        "invalid setting rate_limit.max_wait = -1 "
        "(from environment variable UPBUS_RATE_LIMIT): Input should be greater than 0"
    )


def test_error_from_upbus_toml(tmp_path: Path) -> None:
    user_file = write(tmp_path / "upbus.toml", "[reconnect]\nmultiplier = 1\n")

    assert config_error(_cwd=tmp_path) == (
        f"invalid setting reconnect.multiplier = 1 (from {user_file}): "
        "Input should be greater than 1"
    )


def test_error_from_upbus_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    named = write(tmp_path / "other.toml", "public_url = 'https://api.upbit.com'\n")
    monkeypatch.setenv("UPBUS_CONFIG", str(named))

    assert config_error(_cwd=tmp_path) == (
        f"invalid setting public_url = 'https://api.upbit.com' (from {named}): "
        "Value error, must be a ws:// or wss:// URL"
    )


def test_error_from_pyproject(tmp_path: Path) -> None:
    write(tmp_path / "pyproject.toml", "[tool.upbus]\ndebounce = 11\n")

    assert config_error(_cwd=tmp_path) == (
        "invalid setting debounce = 11 (from pyproject.toml [tool.upbus]): "
        "Input should be less than or equal to 10"
    )


def test_error_from_argument(tmp_path: Path) -> None:
    assert config_error(_cwd=tmp_path, jwt_algorithm="RS256") == (
        "invalid setting jwt_algorithm = 'RS256' (from argument): "
        "Input should be 'HS256', 'HS384' or 'HS512'"
    )


def test_error_names_the_source_that_won(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "upbus.toml", "heartbeat_interval = -1\n")
    monkeypatch.setenv("UPBUS_HEARTBEAT_INTERVAL", "-2")

    assert "= '-2' (from environment variable UPBUS_HEARTBEAT_INTERVAL)" in config_error(
        _cwd=tmp_path
    )


def test_unknown_keys_in_each_source(tmp_path: Path) -> None:
    user_file = write(tmp_path / "upbus.toml", "debounse = 0.2\n[rate_limit]\nmaxwait = 3\n")
    write(tmp_path / "pyproject.toml", "[tool.upbus]\nheartbeat = 1\n")

    assert sorted(config_error(_cwd=tmp_path, formatt="SIMPLE").splitlines()) == [
        f"unknown setting 'debounse' (from {user_file})",
        "unknown setting 'formatt' (from argument)",
        "unknown setting 'heartbeat' (from pyproject.toml [tool.upbus])",
        f"unknown setting 'rate_limit.maxwait' (from {user_file})",
    ]


def test_one_error_lists_every_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "upbus.toml", "[rate_limit]\nbackoff_initial = 5\nbackoff_max = 2\n")
    monkeypatch.setenv("UPBUS_RECONNECT__MAXIMUM", "0.1")
    monkeypatch.setenv("UPBUS_RECONNECT__INITIAL", "1")

    lines = config_error(_cwd=tmp_path, heartbeat_timeout=float("inf")).splitlines()

    assert [line.split(" = ")[0] for line in lines] == [
        "invalid setting heartbeat_timeout",
        "invalid setting rate_limit.backoff_max",
        "invalid setting reconnect.maximum",
    ]
    assert "must be at least backoff_initial (5.0)" in lines[1]


@pytest.mark.parametrize(
    ("name", "closest"),
    [
        ("UPBUS_DEBOUNSE", "UPBUS_DEBOUNCE"),
        ("UPBUS_HEARTBEAT__INTERVAL", "UPBUS_HEARTBEAT_INTERVAL"),
        ("UPBUS_RATE_LIMIT__MAXWAIT", "UPBUS_RATE_LIMIT__MAX_WAIT"),
        ("UPBUS_RECONECT__INITIAL", "UPBUS_RECONNECT__INITIAL"),
        ("upbus_debounse", "UPBUS_DEBOUNCE"),
    ],
)
def test_misspelt_environment_variable_names_the_closest_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, closest: str
) -> None:
    monkeypatch.setenv(name, "3")
    message = config_error(_cwd=tmp_path)
    assert message == f"{name} is not a setting; did you mean {closest}?"


def test_environment_variable_with_no_close_setting_is_still_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UPBUS_QZXJW", SECRET)
    message = config_error(_cwd=tmp_path)
    assert message.startswith("UPBUS_QZXJW is not a setting;")
    assert "did you mean" not in message
    assert "\n" not in message
    assert SECRET not in message


def test_every_unknown_environment_variable_is_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UPBUS_DEBOUNSE", "3")
    monkeypatch.setenv("UPBUS_HEARTBEAT__INTERVAL", "abc")
    lines = config_error(_cwd=tmp_path).splitlines()
    assert [line.split()[0] for line in lines] == ["UPBUS_DEBOUNSE", "UPBUS_HEARTBEAT__INTERVAL"]


@pytest.mark.parametrize(
    "name",
    [
        *sorted(NOT_SETTINGS),
        "UPBUS_PLUGINS__SQLITE__PATH",
        "UPBUS_PLUGINS__NOT_INSTALLED__ANYTHING",
        "UPBUS_PLUGINS__TAPE",
        "UPBUS_RATE_LIMIT",
        "UPBUS_RATE_LIMIT__MESSAGES_PER_MINUTE",
        "upbus_heartbeat_interval",
    ],
)
def test_names_that_are_not_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    value = {"UPBUS_CONFIG": "upbus.toml", "UPBUS_PLUGINS__TAPE": '{"depth": 5}'}
    value["UPBUS_RATE_LIMIT"] = '{"max_wait": 30}'
    write(tmp_path / "upbus.toml", "")
    monkeypatch.setenv(name, value.get(name, "7"))
    load_settings(_cwd=tmp_path)


def test_every_upbus_variable_the_tests_read_is_let_through() -> None:
    tests = Path(__file__).parent
    read = set()
    for path in tests.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        read |= set(re.findall(r"environ\.get\(\s*\"(UPBUS_[A-Z_]+)\"", text))
    assert read, "no UPBUS_ variable found: the pattern is out of date"
    assert read <= NOT_SETTINGS | {"UPBUS_CONFIG"}


def test_unreadable_toml_is_a_config_error(tmp_path: Path) -> None:
    user_file = write(tmp_path / "upbus.toml", "debounce = = 1\n")

    message = config_error(_cwd=tmp_path)

    assert message.startswith(f"cannot read {user_file}: ")


def test_non_table_pyproject_section_is_a_config_error(tmp_path: Path) -> None:
    write(tmp_path / "pyproject.toml", "[tool]\nupbus = 1\n")

    assert "[tool.upbus] must be a table" in config_error(_cwd=tmp_path)


# --- secrets --------------------------------------------------------------------


def test_secrets_are_masked_in_repr_and_explain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "upbus.toml", f"access_key = '{SECRET}-a'\n")
    monkeypatch.setenv("UPBUS_SECRET_KEY", SECRET)
    settings = load_settings(_cwd=tmp_path, plugins={"db": {"api_token": SECRET, "port": 1}})

    assert settings.secret_key is not None
    assert settings.secret_key.get_secret_value() == SECRET
    rows = {name: value for name, value, _ in explain_settings(settings)}
    assert rows["access_key"] == rows["secret_key"] == rows["plugins.db.api_token"] == "**********"
    assert rows["plugins.db.port"] == "1"
    for text in (repr(settings), str(settings), repr(explain_settings(settings))):
        assert SECRET not in text


def test_secrets_are_masked_in_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "upbus.toml", f"acces_key = '{SECRET}'\nsecret_key = 12345\n")
    monkeypatch.setenv("UPBUS_ACCESS_KEY", SECRET)

    with pytest.raises(ConfigError) as info:
        load_settings(_cwd=tmp_path, plugins={"db": {"password": SECRET}}, debounce="x")

    message = str(info.value)
    assert "invalid setting secret_key = ********** (from " in message
    assert "unknown setting 'acces_key' (from " in message
    assert "invalid setting debounce = 'x' (from argument)" in message
    # The pydantic error, which holds the raw inputs, must not ride along as the cause.
    assert SECRET not in "".join(traceback.format_exception(info.value))


# --- the model itself -----------------------------------------------------------


@pytest.mark.parametrize("model", [Settings, RateLimitSettings, ReconnectSettings])
def test_every_field_is_documented(model: type[BaseModel]) -> None:
    undocumented = [name for name, field in model.model_fields.items() if not field.description]
    assert undocumented == []


@pytest.mark.parametrize(
    "url", ["ws://localhost:8080/websocket/v1", "wss://api.upbit.com/websocket/v1"]
)
def test_websocket_urls_are_accepted(tmp_path: Path, url: str) -> None:
    assert load_settings(_cwd=tmp_path, public_url=url, private_url=url).public_url == url


@pytest.mark.parametrize("url", ["http://api.upbit.com", "api.upbit.com", "wss://"])
def test_other_urls_are_rejected(tmp_path: Path, url: str) -> None:
    assert "must be a ws:// or wss:// URL" in config_error(_cwd=tmp_path, private_url=url)


# --- credentials in URLs --------------------------------------------------------


def test_upbus_config_shows_urls_with_the_password_masked(tmp_path: Path) -> None:
    from clirun import run_upbus

    env = {
        "UPBUS_PLUGINS__POSTGRES__DSN": f"postgresql://rec:{SECRET}@db.example:5433/ticks",
        "UPBUS_NATS_URL": f"nats://bus:{SECRET}@n1:4222,nats://bus:{SECRET}2@n2:4222",
    }
    result = run_upbus("config", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout
    rows = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()}
    assert rows["plugins.postgres.dsn"] == "'postgresql://rec:****@db.example:5433/ticks'"
    assert rows["nats_url"] == "'nats://bus:****@n1:4222,nats://bus:****@n2:4222'"


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("postgresql://rec:pw@db/ticks", "postgresql://rec:****@db/ticks"),
        ("postgresql://rec@db/ticks", "postgresql://rec@db/ticks"),
        ("postgresql://rec:pw@h1:5432,h2:5432/t", "postgresql://rec:****@h1:5432,h2:5432/t"),
        ("postgresql://db/t?user=rec&password=pw", "postgresql://db/t?user=rec&password=****"),
        ("host=db user=rec password=pw dbname=t", "host=db user=rec password=**** dbname=t"),
        ("host=db password='p w' dbname=t", "host=db password=**** dbname=t"),
        ("nats://a:pw@n1:4222, tls://b:pw@n2", "nats://a:****@n1:4222, tls://b:****@n2"),
        ("nats://s3cr3t-token@n1:4222", "nats://****@n1:4222"),
        ("postgresql://rec:p@w@db/t", "postgresql://rec:****@db/t"),  # an unencoded "@"
        ("wss://api.upbit.com/websocket/v1", "wss://api.upbit.com/websocket/v1"),
        (
            "postgresql://db:5432/t?application_name=a@b",
            "postgresql://db:5432/t?application_name=a@b",
        ),
    ],
)
def test_credentials_in_a_url_or_dsn_are_masked_and_the_rest_kept(raw: str, shown: str) -> None:
    from upbus.settings.sources import mask_credentials

    assert mask_credentials(raw) == shown


def test_a_dsn_password_is_masked_in_the_settings_repr(tmp_path: Path) -> None:
    dsn = f"postgresql://rec:{SECRET}@db.example/ticks"
    settings = load_settings(_cwd=tmp_path, plugins={"postgres": {"dsn": dsn}})
    assert settings.plugins["postgres"]["dsn"] == dsn  # the value itself is intact
    for text in (repr(settings), str(settings)):
        assert SECRET not in text
        assert "postgresql://rec:****@db.example/ticks" in text


def test_an_invalid_url_is_named_without_its_password(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(_cwd=tmp_path, nats_url=f"http://bus:{SECRET}@n1:4222")
    message = str(info.value)
    assert "invalid setting nats_url = 'http://bus:****@n1:4222' (from argument)" in message
    assert SECRET not in "".join(traceback.format_exception(info.value))


def test_an_invalid_plugin_setting_beside_a_dsn_does_not_show_its_password(
    tmp_path: Path,
) -> None:
    from upbus.plugins.postgres_store import PostgresSettings

    section = {"dsn": f"postgresql://rec:{SECRET}@db/t", "batch_size": 0, "dns": "typo"}
    settings = load_settings(_cwd=tmp_path, plugins={"postgres": section})
    with pytest.raises(ConfigError) as info:
        settings.plugin_section("postgres", PostgresSettings)
    message = str(info.value)
    assert "invalid setting plugins.postgres.batch_size = 0 (from argument)" in message
    assert "unknown setting 'plugins.postgres.dns' (from argument)" in message
    assert SECRET not in "".join(traceback.format_exception(info.value))


def test_the_repr_of_settings_masks_the_nats_url_password() -> None:
    settings = load_settings(nats_url="nats://alice:hunter2@nats.internal:4222")
    assert "hunter2" not in repr(settings)
    assert "nats://alice:****@nats.internal:4222" in repr(settings)

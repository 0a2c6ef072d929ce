"""Where settings come from, and how to name that source in messages.

Every source is wrapped in :class:`Recorded`, which keeps what the source returned.
After a build the recorded :class:`Layer` objects answer "which source supplied
this key?", which error messages and ``explain_settings`` both need. Secrets are
masked here too, so every message goes through one place.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import BaseModel, Secret, SecretBytes, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
)

from upbus.core._errors import ConfigError

__all__ = (
    "CONFIG_ENV",
    "ENV_PREFIX",
    "MASK",
    "NOT_SETTINGS",
    "PASSWORD_MASK",
    "PYPROJECT_LABEL",
    "EnvLayer",
    "Layer",
    "Loc",
    "Recorded",
    "build_sources",
    "check_env_names",
    "describe_errors",
    "display",
    "dotted",
    "leaves",
    "mask",
    "mask_credentials",
    "origin",
)

CONFIG_ENV = "UPBUS_CONFIG"
ENV_PREFIX = "UPBUS_"
# ``UPBUS_…`` variables that are read by design but are not settings, so the
# unknown-name check lets them through: the config file path, and the test
# suite's switches (require the external services; where the Upbit samples live).
NOT_SETTINGS = frozenset({CONFIG_ENV, "UPBUS_REQUIRE_SERVICES", "UPBUS_SAMPLES"})
# Below this difflib ratio a valid name is not offered as "did you mean".
_CLOSE_ENOUGH = 0.6
USER_FILE = "upbus.toml"
PYPROJECT_LABEL = "pyproject.toml [tool.upbus]"
MASK = "**********"
#: What stands for the password in a URL or a ``password=`` parameter.
PASSWORD_MASK = "****"

Loc = tuple[str | int, ...]

# Plugin sections are free-form dicts, so their secrets can only be recognised by name.
_SECRET_NAME = re.compile(r"secret|passw|token|key|credential", re.IGNORECASE)
# A URL runs to whitespace, or to a comma that starts the next URL of a list
# (``nats://a@h1,nats://b@h2``); a comma inside one (libpq's ``h1,h2`` hosts) does not
# end it.
_SCHEME = r"[A-Za-z][A-Za-z0-9+.-]*://"
_URL = re.compile(rf"(?P<scheme>{_SCHEME})(?P<rest>(?:(?!,{_SCHEME})\S)*)")
# libpq takes a password as a key=value word or a URL query parameter too.
_PASSWORD_PARAMETER = re.compile(
    r"(?P<key>\bpassword\s*=\s*)(?P<value>'(?:[^'\\]|\\.)*'|[^\s&',]+)", re.IGNORECASE
)
# In these, a user with no password is a token (``nats://TOKEN@host``).
_TOKEN_SCHEMES = ("nats://", "tls://")


@dataclass(frozen=True)
class Layer:
    """The values one source supplied, under the label that names the source."""

    label: str
    values: Mapping[str, Any]

    def origin(self, loc: Loc) -> str | None:
        """This source's label if it supplied ``loc``, else ``None``."""
        return self.label if _supplies(self.values, loc) else None


@dataclass(frozen=True)
class EnvLayer(Layer):
    """Values from ``UPBUS_…`` variables; the label names the exact variable."""

    prefix: str = ""
    names: frozenset[str] = frozenset()  # lower-cased names of the variables under the prefix

    def origin(self, loc: Loc) -> str | None:
        if not _supplies(self.values, loc):
            return None
        # A nested key comes from its own ``A__B`` variable or from a JSON value of a parent's.
        for end in range(len(loc), 0, -1):
            name = (self.prefix + "__".join(str(part) for part in loc[:end])).lower()
            if name in self.names:
                return f"environment variable {name.upper()}"
        return self.label


def _supplies(values: Any, loc: Loc) -> bool:
    for part in loc:
        if isinstance(values, Mapping):
            if part not in values:
                return False
            values = values[part]
        elif isinstance(values, list) and isinstance(part, int) and 0 <= part < len(values):
            values = values[part]
        else:
            # A scalar here (a comma-separated list, say) is what validation turned into ``loc``.
            return True
    return True


class Recorded(PydanticBaseSettingsSource):
    """Wraps a source and keeps what it returned as a labelled :class:`Layer`."""

    def __init__(self, inner: PydanticBaseSettingsSource, label: str) -> None:
        super().__init__(inner.settings_cls)
        self.inner = inner
        self.layer = Layer(label, {})

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.inner.get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        values = self.inner()
        if isinstance(self.inner, EnvSettingsSource):
            prefix = self.inner.env_prefix.lower()
            names = frozenset(
                name.lower() for name in self.inner.env_vars if name.lower().startswith(prefix)
            )
            self.layer = EnvLayer(self.layer.label, values, prefix, names)
        else:
            self.layer = Layer(self.layer.label, values)
        return values


def build_sources(
    settings_cls: type[BaseSettings],
    init: PydanticBaseSettingsSource,
    env: PydanticBaseSettingsSource,
    cwd: Path,
) -> tuple[Recorded, ...]:
    """The sources in precedence order, highest first, reading files relative to ``cwd``."""
    cwd = cwd.absolute()
    user_file = _user_file(cwd)
    pyproject = _read_toml(cwd / "pyproject.toml", ("tool", "upbus"))
    return (
        Recorded(init, "argument"),
        Recorded(env, "environment"),
        Recorded(InitSettingsSource(settings_cls, _read_toml(user_file, ())), str(user_file)),
        Recorded(InitSettingsSource(settings_cls, pyproject), PYPROJECT_LABEL),
    )


def check_env_names(model: type[BaseModel], environ: Mapping[str, str]) -> None:
    """Refuse ``UPBUS_…`` variables that name no setting of ``model``.

    Names match case-insensitively, as pydantic-settings reads them. A nested model
    accepts its own ``A`` (a JSON object) and ``A__B`` for each of its fields; a
    dict field (``plugins``) accepts any ``A__…``, since each plugin validates its
    own section. :data:`NOT_SETTINGS` are let through.

    Raises:
        ConfigError: one line per unknown variable, with the closest valid name
            when one is close enough.
    """
    valid, open_prefixes = _env_names(model, ENV_PREFIX)
    lines = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in NOT_SETTINGS or upper in valid:
            continue
        if any(upper.startswith(prefix) for prefix in open_prefixes):
            continue
        close = difflib.get_close_matches(upper, sorted(valid), n=1, cutoff=_CLOSE_ENOUGH)
        hint = f"did you mean {close[0]}?" if close else "upbus config lists every setting"
        lines.append(f"{name} is not a setting; {hint}")
    if lines:
        raise ConfigError("\n".join(lines))


def _env_names(model: type[BaseModel], prefix: str) -> tuple[set[str], list[str]]:
    """Every valid variable name under ``prefix``, and the prefixes open to any suffix."""
    valid: set[str] = set()
    open_prefixes: list[str] = []
    for field_name, info in model.model_fields.items():
        name = prefix + field_name.upper()
        valid.add(name)
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            nested, nested_open = _env_names(annotation, name + "__")
            valid |= nested
            open_prefixes += nested_open
        elif (get_origin(annotation) or annotation) is dict:
            open_prefixes.append(name + "__")
    return valid, open_prefixes


def _user_file(cwd: Path) -> Path:
    named = os.environ.get(CONFIG_ENV)
    if not named:
        return cwd / USER_FILE
    path = cwd / Path(named).expanduser()  # an absolute name replaces cwd
    if not path.is_file():
        raise ConfigError(f"{CONFIG_ENV} names {path}, which is not a file")
    return path


def _read_toml(path: Path, table: tuple[str, ...]) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    for key in table:
        data = data.get(key, {})
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: [{'.'.join(table)}] must be a table")
    return data


def origin(layers: Sequence[Layer], loc: Loc) -> str:
    """Label of the highest-precedence source that supplied ``loc``; ``default`` if none did."""
    for layer in layers:
        found = layer.origin(loc)
        if found is not None:
            return found
    return "default"


def dotted(loc: Loc) -> str:
    return ".".join(str(part) for part in loc)


def leaves(value: Any, loc: Loc = ()) -> Iterator[tuple[Loc, Any]]:
    """Each non-dict value inside ``value`` (an empty dict counts as one) with its location."""
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from leaves(item, (*loc, key))
    else:
        yield loc, value


def display(model: type[BaseModel], loc: Loc, value: Any) -> str:
    """``repr(value)`` with secrets masked; ``loc`` is relative to ``model``."""
    if value is None:
        return "None"
    if _is_secret(model, loc):
        return MASK
    return repr(mask(value))


def _is_secret(model: type[BaseModel], loc: Loc) -> bool:
    if any(isinstance(part, str) and _SECRET_NAME.search(part) for part in loc):
        return True
    current: type[BaseModel] | None = model
    for part in loc:
        info = current.model_fields.get(part) if current and isinstance(part, str) else None
        if info is None:
            return False
        if _mentions_secret(info.annotation):
            return True
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            current = annotation
        else:
            current = None
    return False


def _mentions_secret(annotation: Any) -> bool:
    kind = get_origin(annotation) or annotation
    if isinstance(kind, type) and issubclass(kind, Secret | SecretStr | SecretBytes):
        return True
    return any(_mentions_secret(arg) for arg in get_args(annotation))


def mask(value: Any) -> Any:
    """``value`` with the values of secret-looking keys masked, and the credentials
    in its text (:func:`mask_credentials`), at any depth."""
    if isinstance(value, Mapping):
        return {
            key: MASK if isinstance(key, str) and _SECRET_NAME.search(key) else mask(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(mask(item) for item in value)
    if isinstance(value, str):
        return mask_credentials(value)
    return value


def mask_credentials(text: str) -> str:
    """``text`` with the password of every URL in it shown as ``****``, the rest kept.

    ``postgresql://user:secret@db:5432/x`` becomes ``postgresql://user:****@db:5432/x``;
    each URL of a comma-separated list is masked; a NATS token
    (``nats://TOKEN@host``) becomes ``nats://****@host``; and a libpq ``password=``
    (``host=db password=secret``, ``…/x?password=secret``) ``password=****``.
    """
    return _PASSWORD_PARAMETER.sub(
        lambda found: found["key"] + PASSWORD_MASK, _URL.sub(_mask_url, text)
    )


def _mask_url(found: re.Match[str]) -> str:
    scheme, rest = found["scheme"], found["rest"]
    # An "@" in the query or fragment is no user information; one in the path may be
    # of a password that should have been percent-encoded, so it counts.
    userinfo, at, _ = re.split(r"[?#]", rest, maxsplit=1)[0].rpartition("@")
    if not at:
        return found[0]
    address = rest[len(userinfo) + 1 :]
    user, colon, _password = userinfo.partition(":")
    if colon:
        return f"{scheme}{user}:{PASSWORD_MASK}@{address}"
    if scheme.lower() in _TOKEN_SCHEMES:
        return f"{scheme}{PASSWORD_MASK}@{address}"
    return found[0]


def describe_errors(
    exc: ValidationError,
    model: type[BaseModel],
    layers: Sequence[Layer],
    prefix: Loc = (),
) -> str:
    """One line per error: the dotted setting, its masked value, the source and the reason.

    ``prefix`` places ``model`` inside the settings, e.g. ``("plugins", "sqlite")``.
    """
    lines = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        name = dotted((*prefix, *loc))
        source = origin(layers, (*prefix, *loc))
        if error["type"] == "extra_forbidden":
            # No value: an unknown key may well be a misspelt secret.
            lines.append(f"unknown setting {name!r} (from {source})")
        else:
            value = display(model, loc, error["input"])
            # A validator's message may quote the value it refused.
            reason = mask_credentials(error["msg"])
            lines.append(f"invalid setting {name} = {value} (from {source}): {reason}")
    return "\n".join(lines)

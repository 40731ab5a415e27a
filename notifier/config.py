"""Settings and routes: one pydantic-settings model read from flag > environment > TOML > default.

`load_settings` is the only entry point; it raises `ConfigError`, whose message is one
paragraph that names the bad setting and where it came from, and never a secret.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import fnmatch
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    DirectoryPath,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from redis.asyncio.connection import parse_url as parse_redis_url

from notifier.models import COMPLETED, FAILED, STATUSES

ENV_PREFIX = "NOTIFIER_"
API_KEY_ALIAS = "CHAMELAION_API_KEY"
CONFIG_ENV = ENV_PREFIX + "CONFIG"
# Headers the sinks set themselves: the contract fixes their values, and a route
# overriding them would break signatures or send a header twice.
RESERVED_HEADERS = frozenset(
    {
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "content-type",
        "user-agent",
        "content-length",
        "host",
    }
)
# Route options that mean something only with `digest` set.
DIGEST_OPTIONS = frozenset({"digest_wait", "digest_interval", "digest_statuses", "digest_template"})
SLACK_ROUTE = "slack"
WEBHOOK_ROUTE = "webhook"


class ConfigError(Exception):
    """A setting, route or config file is unusable; the message says which and why."""


def env_name(field: str) -> str:
    """The environment variable of a setting: `poll_interval` -> `NOTIFIER_POLL_INTERVAL`."""
    return ENV_PREFIX + field.upper()


def flag_name(field: str) -> str:
    """The command-line flag of a setting: `poll_interval` -> `--poll-interval`."""
    return "--" + field.replace("_", "-")


def decode_webhook_secrets(value: str) -> list[bytes]:
    """Signing keys of a space-separated list of `whsec_` secrets (several during rotation)."""
    keys = []
    for secret in value.split():
        if not secret.startswith("whsec_"):
            raise ValueError("every secret must start with whsec_ (Standard Webhooks format)")
        try:
            keys.append(base64.b64decode(secret.removeprefix("whsec_"), validate=True))
        except binascii.Error:
            raise ValueError("the part after whsec_ must be base64") from None
    if not keys or not all(keys):
        raise ValueError("must hold at least one non-empty whsec_ secret")
    return keys


def _split_list(value: Any) -> Any:
    # Lists arrive from TOML as lists and from flags and env as "completed,failed".
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _known_statuses(values: list[str]) -> list[str]:
    unknown = [status for status in values if status not in STATUSES]
    if unknown:
        raise ValueError(
            f"unknown status {', '.join(map(repr, unknown))}; "
            f"expected some of {', '.join(STATUSES)}"
        )
    if not values:
        raise ValueError(f"at least one status is required, from {', '.join(STATUSES)}")
    return list(dict.fromkeys(values))


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    return value


def _base_url(value: str) -> str:
    # Paths are appended to it: "https://host/api/" must not give "//v1".
    return _http_url(value).rstrip("/")


def _secret_http_url(value: SecretStr) -> SecretStr:
    _http_url(value.get_secret_value())
    return value


def _redis_url(value: SecretStr) -> SecretStr:
    # Checked here, so a typo is a configuration error of every command, not a traceback
    # at the first connection. The messages never quote the URL: it may hold a password.
    url = value.get_secret_value()
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    try:
        options = parse_redis_url(url)
    except ValueError as exc:
        raise ValueError(f"is not a usable Redis URL: {str(exc).rstrip('.')}") from None
    if parts.scheme != "unix":
        if not parts.hostname:
            raise ValueError("must name the Redis host, e.g. redis://redis:6379/0")
        if options.get("port") == 0:
            raise ValueError("the port must be between 1 and 65535")
        database = parts.path.strip("/")
        if database and not (database.isascii() and database.isdigit()):
            raise ValueError("the path after the host must be a database number such as /0")
    return value


def _webhook_secret(value: SecretStr) -> SecretStr:
    decode_webhook_secrets(value.get_secret_value())
    return value


def _no_unknown_statuses(values: list[str]) -> list[str]:
    return _known_statuses(values) if values else values


Seconds = Annotated[float, Field(allow_inf_nan=False)]
Statuses = Annotated[
    list[str], NoDecode, BeforeValidator(_split_list), AfterValidator(_known_statuses)
]
# Like Statuses, but none is a valid choice.
OptionalStatuses = Annotated[
    list[str], NoDecode, BeforeValidator(_split_list), AfterValidator(_no_unknown_statuses)
]
HttpUrlStr = Annotated[str, AfterValidator(_http_url)]
SecretHttpUrl = Annotated[SecretStr, AfterValidator(_secret_http_url)]
WebhookSecret = Annotated[SecretStr, AfterValidator(_webhook_secret)]


class Route(BaseModel):
    """One destination: a `[[routes]]` table of the TOML file, or an environment shortcut."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$",
        description="unique name of the route, used in logs and metric labels",
    )
    type: Literal["slack", "webhook"] = Field(description="slack or webhook")
    url: SecretHttpUrl = Field(description="where to POST; treated as a secret")
    secret: WebhookSecret | None = Field(
        None, description="whsec_ signing secret, or several separated by spaces (rotation)"
    )
    headers: dict[str, SecretStr] = Field(
        default_factory=dict, description="extra HTTP headers; values are treated as secrets"
    )
    template: str | None = Field(
        None, description="template path under the template directories, e.g. slack/short.json.j2"
    )
    statuses: Statuses | None = Field(
        None, description="statuses this route receives, a subset of notify_on (default: all)"
    )
    reference_id: str | None = Field(
        None, min_length=1, description="glob the request's reference_id must match"
    )
    max_concurrency: int = Field(4, ge=1, description="most sends in flight to this route")
    digest: Literal["reference_id"] | None = Field(
        None,
        description='"reference_id": one message per settled batch instead of one per request',
    )
    digest_wait: Seconds = Field(
        30, ge=0, description="seconds nothing in a batch may change before it settles"
    )
    digest_interval: Seconds = Field(
        300, ge=0, description="least seconds between two digests of one batch (follow-ups)"
    )
    digest_statuses: OptionalStatuses = Field(
        default_factory=list,
        description="statuses still sent one by one, at once, on a digest route, e.g. failed",
    )
    digest_template: str | None = Field(
        None, description="template path of the digest, e.g. slack/digest.json.j2"
    )

    def accepts(self, status: str, reference_id: str | None) -> bool:
        """Whether this route sends a request entering `status` on its own: its statuses and
        glob, and on a digest route only outside batches or in `digest_statuses`."""
        if self.statuses is not None and status not in self.statuses:
            return False
        if not self.matches(reference_id):
            return False
        return self.digest is None or reference_id is None or status in self.digest_statuses

    def matches(self, reference_id: str | None) -> bool:
        """Whether `reference_id` matches this route's glob (any does without one)."""
        if self.reference_id is None:
            return True
        return reference_id is not None and fnmatch.fnmatchcase(reference_id, self.reference_id)

    def digests(self, reference_id: str) -> bool:
        """Whether this route sends a digest of the batch `reference_id`."""
        return self.digest is not None and self.matches(reference_id)

    @model_validator(mode="after")
    def _consistent(self) -> Route:
        if self.secret is not None and self.type != "webhook":
            raise ValueError("secret is only for webhook routes (Slack does not verify signatures)")
        for header in self.headers:
            if header.lower() in RESERVED_HEADERS:
                raise ValueError(
                    f"header {header!r} is set by the notifier and cannot be overridden"
                )
        for name in ("template", "digest_template"):
            path = getattr(self, name)
            if path is not None and (Path(path).is_absolute() or ".." in Path(path).parts):
                raise ValueError(
                    f"{name} must be a relative path inside the template directories, got {path!r}"
                )
        if self.digest is None:
            options = sorted(self.model_fields_set & DIGEST_OPTIONS)
            if options:
                raise ValueError(
                    f"{', '.join(options)} only applies to a digest route; add "
                    f'digest = "reference_id" or remove {"them" if len(options) > 1 else "it"}'
                )
        return self


class Settings(BaseSettings):
    """Every setting of the notifier; see docs/configuration.md, which a test keeps in step."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", env_ignore_empty=True)

    config: Path | None = Field(None, description="TOML file with any setting below and [[routes]]")
    api_url: Annotated[str, AfterValidator(_base_url)] = Field(
        "https://api.chamelaion.com/api",
        description="API base URL; requests go to {api_url}/v1/lipsync/requests",
    )
    api_key: SecretStr | None = Field(
        None, description=f"Chamelaion API key, sent as x-api-key (or {API_KEY_ALIAS})"
    )
    redis_url: Annotated[SecretStr, AfterValidator(_redis_url)] | None = Field(
        None, description="Redis URL; unset means an in-memory store that forgets on restart"
    )
    key_prefix: str = Field(
        "notifier",
        pattern=r"^[A-Za-z0-9_.:-]{1,64}$",
        description="namespace of every Redis key (letters, digits, _ . : -)",
    )
    poll_interval: Seconds = Field(15, ge=0.1, description="seconds between poll cycles")
    page_size: int = Field(100, ge=1, description="limit per list call")
    list_concurrency: int = Field(
        4, ge=1, le=64, description="list calls in flight at once after the first page"
    )
    idle_interval: Seconds | None = Field(
        None,
        ge=0.1,
        description="seconds between poll cycles while no request is unfinished "
        "(unset: the poll interval)",
    )
    api_rate_limit: float = Field(
        100,
        gt=0,
        allow_inf_nan=False,
        description="most API calls a second; halved after a 429, then recovering gradually",
    )
    safety_net_period: Seconds = Field(
        3600,
        ge=1,
        description="seconds over which the safety net reads the whole listing again, a "
        "few pages a cycle (the API's rate allowing)",
    )
    api_timeout: Seconds = Field(30, gt=0, description="seconds per API call, connecting included")
    api_max_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        description="largest API response body read (bytes); a larger page is read again "
        "with a smaller limit, down to 1",
    )
    reference_id: str | None = Field(
        None, min_length=1, description="watch only requests with this reference_id"
    )
    notify_on: Statuses = Field([COMPLETED, FAILED], description="statuses that fire notifications")
    notify_existing: bool = Field(
        False, description="on the first cycle, also notify requests already finished"
    )
    retention_days: float = Field(
        30,
        gt=0,
        allow_inf_nan=False,
        description="days a finished request's state is kept; it is never notified again",
    )
    slack_webhook_url: SecretHttpUrl | None = Field(
        None, description="adds a route named slack with the default Slack template"
    )
    webhook_url: HttpUrlStr | None = Field(
        None, description="adds a route named webhook with the default webhook template"
    )
    webhook_secret: WebhookSecret | None = Field(
        None, description="whsec_ secret(s) that sign the route named webhook"
    )
    templates_dir: DirectoryPath | None = Field(
        None, description="directory searched before the bundled templates"
    )
    retry_max_attempts: int = Field(10, ge=1, description="delivery attempts before dead-lettering")
    retry_base_delay: Seconds = Field(
        2, gt=0, description="first backoff step, doubled per attempt"
    )
    retry_max_delay: Seconds = Field(600, gt=0, description="cap of one backoff step")
    delivery_timeout: Seconds = Field(10, gt=0, description="seconds per delivery attempt")
    http_host: str = Field(
        "0.0.0.0",  # noqa: S104 - probes and Prometheus reach a container from outside
        min_length=1,
        description="address the HTTP server listens on",
    )
    http_port: int = Field(
        8080, ge=0, le=65535, description="port of /healthz, /readyz and /metrics; 0 turns it off"
    )
    log_format: Literal["text", "json"] = Field("text", description="text or json")
    # Read from [[routes]]; after validation it holds every route, the shortcuts included.
    routes: list[Route] = Field(
        default_factory=list, description="[[routes]] tables of the TOML file"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags (init arguments) > NOTIFIER_* > CHAMELAION_API_KEY > TOML file > defaults."""
        flags = init_settings.init_kwargs if isinstance(init_settings, InitSettingsSource) else {}
        path = config_path(flags)
        alias = {"api_key": os.environ[API_KEY_ALIAS]} if os.environ.get(API_KEY_ALIAS) else {}
        return (
            init_settings,
            _EnvWithoutRoutes(settings_cls),
            InitSettingsSource(settings_cls, alias),
            InitSettingsSource(settings_cls, read_config_file(path) if path else {}),
        )

    @model_validator(mode="after")
    def _check_across_settings(self) -> Settings:
        if self.retry_max_delay < self.retry_base_delay:
            raise ValueError(
                f"{env_name('retry_max_delay')} ({self.retry_max_delay:g}) must be at least "
                f"{env_name('retry_base_delay')} ({self.retry_base_delay:g})"
            )
        routes = [*self.routes, *self._shortcut_routes()]
        names = [route.name for route in routes]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(
                f"route name {', '.join(map(repr, duplicates))} is used more than once; "
                f"names must be unique (the {SLACK_ROUTE} and {WEBHOOK_ROUTE} routes of "
                f"{env_name('slack_webhook_url')} and {env_name('webhook_url')} count too)"
            )
        self.routes = [self._with_statuses(self._with_webhook_secret(route)) for route in routes]
        if self.webhook_secret is not None and WEBHOOK_ROUTE not in names:
            raise ValueError(
                f"{env_name('webhook_secret')} is set but there is no route named "
                f"{WEBHOOK_ROUTE!r} to sign; set {env_name('webhook_url')} or add that route"
            )
        return self

    def _shortcut_routes(self) -> list[Route]:
        routes = []
        if self.slack_webhook_url is not None:
            routes.append(Route(name=SLACK_ROUTE, type="slack", url=self.slack_webhook_url))
        if self.webhook_url is not None:
            routes.append(
                Route(name=WEBHOOK_ROUTE, type="webhook", url=SecretStr(self.webhook_url))
            )
        return routes

    def _with_webhook_secret(self, route: Route) -> Route:
        # The environment outranks the TOML file, so NOTIFIER_WEBHOOK_SECRET also signs a
        # [[routes]] table named "webhook" (a Kubernetes Secret beside a ConfigMap).
        if route.name != WEBHOOK_ROUTE or self.webhook_secret is None:
            return route
        if route.type != "webhook":
            raise ValueError(
                f"{env_name('webhook_secret')} signs the route named {WEBHOOK_ROUTE!r}, "
                f"but that route has type {route.type!r}"
            )
        return route.model_copy(update={"secret": self.webhook_secret})

    def _with_statuses(self, route: Route) -> Route:
        statuses = list(self.notify_on) if route.statuses is None else route.statuses
        route = route.model_copy(update={"statuses": statuses})
        extra = [status for status in statuses if status not in self.notify_on]
        if extra:
            raise ValueError(
                f"route {route.name!r}: statuses {', '.join(map(repr, extra))} are not in "
                f"notify_on ({', '.join(self.notify_on)}); add them to "
                f"{env_name('notify_on')} or remove them from the route"
            )
        extra = [status for status in route.digest_statuses if status not in statuses]
        if extra:
            raise ValueError(
                f"route {route.name!r}: digest_statuses {', '.join(map(repr, extra))} are not "
                f"among the statuses the route receives ({', '.join(statuses)})"
            )
        return route

    @property
    def digest_routes(self) -> list[Route]:
        """The routes that send batch digests."""
        return [route for route in self.routes if route.digest is not None]

    def require(self, field: str, why: str) -> Any:
        """The value of a setting a command needs; `ConfigError` naming it if it is unset."""
        if (value := getattr(self, field)) is not None:
            return value
        alias = f" (or {API_KEY_ALIAS})" if field == "api_key" else ""
        raise ConfigError(
            f"{env_name(field)} is not set: {why}. Set {env_name(field)}{alias} in the "
            f"environment, pass {flag_name(field)}, or put {field} in the TOML file."
        )

    def template_dirs(self) -> list[Path]:
        """Where templates are looked up, first match wins: templates_dir, then the bundled ones."""
        return [*([self.templates_dir] if self.templates_dir else []), bundled_templates_dir()]


class _EnvWithoutRoutes(EnvSettingsSource):
    """Environment variables for every setting but routes, which only the TOML file holds."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        if field_name == "routes":
            return None, field_name, False
        return super().get_field_value(field, field_name)


def bundled_templates_dir() -> Path:
    """The templates shipped with the package."""
    # An installed wheel carries them inside the package; a source checkout keeps
    # them at the top of the repository, where users look for them.
    packaged = Path(__file__).with_name("templates")
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "templates"


def config_path(flags: dict[str, Any]) -> Path | None:
    """The TOML file named by --config, else by NOTIFIER_CONFIG, else none."""
    value = flags.get("config") or os.environ.get(CONFIG_ENV)
    return Path(value) if value else None


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings of a TOML file; relative template paths are taken from its directory."""
    named = f"the config file {path} (named by {CONFIG_ENV} or --config)"
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {named}: {exc.strerror or exc}.") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{named} is not valid TOML: {exc}.") from None
    if "config" in values:
        raise ConfigError(
            f"the config file {path} sets 'config'; a config file cannot name another one."
        )
    if isinstance(values.get("templates_dir"), str):
        values["templates_dir"] = str(path.parent / values["templates_dir"])
    return values


class _Standalone(Settings):
    """Settings that read neither the environment nor a TOML file."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only the values given."""
        return (init_settings,)


def standalone_settings(**values: Any) -> Settings:
    """Settings from `values` and the defaults alone, whatever the environment holds: the
    demo must run the same on every machine."""
    return _Standalone(**values)


def load_settings(flags: dict[str, Any] | None = None) -> Settings:
    """Settings from command-line flags, the environment, the TOML file and defaults."""
    flags = dict(flags or {})
    try:
        return Settings(**flags)
    except ValidationError as exc:
        path = config_path(flags)
        file_values = read_config_file(path) if path else {}
        problems = [_describe(error, flags, path, file_values) for error in exc.errors()]
        raise ConfigError("invalid configuration: " + "; ".join(problems) + ".") from None


def _describe(error: Any, flags: dict[str, Any], path: Path | None, file: dict[str, Any]) -> str:
    """One problem found by pydantic, said with its origin and never with a secret value."""
    loc, message = error["loc"], error["msg"].removeprefix("Value error, ").rstrip(".")
    if not loc:  # a check across settings: its message is complete
        return message
    if loc[0] == "routes" and len(loc) > 1:
        return _describe_route(_route_label(loc[1], path, file), error, message, loc[2:])
    field = str(loc[0])
    if error["type"] == "extra_forbidden":
        return f"unknown key {field!r} in {path}{_did_you_mean(field, Settings.model_fields)}"
    origin = _origin(field, flags, path)
    return _describe_value(origin, Settings.model_fields[field], error, message)


def _route_label(index: int, path: Path | None, file: dict[str, Any]) -> str:
    """`[[routes]] #2 ('ops') in notifier.toml`: the table as the user wrote it."""
    tables = file.get("routes")
    table = tables[index] if isinstance(tables, list) and index < len(tables) else {}
    name = table.get("name") if isinstance(table, dict) else None
    named = f" ({name!r})" if isinstance(name, str) else ""
    return f"[[routes]] #{index + 1}{named} in {path}"


def _describe_route(where: str, error: Any, message: str, rest: tuple[Any, ...]) -> str:
    if not rest:  # a check across the route's own fields
        return f"{where}: {message}"
    field = str(rest[0])
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key {field!r}{_did_you_mean(field, Route.model_fields)}"
    if error["type"] == "missing":
        return f"{where}: {field} is required ({Route.model_fields[field].description})"
    return _describe_value(f"{where}: {field}", Route.model_fields[field], error, message)


def _describe_value(where: str, field: Any, error: Any, message: str) -> str:
    shown = "" if _holds_secret(field.annotation) else f" = {_show(error['input'])}"
    return f"{where}{shown}: {message[:1].lower()}{message[1:]} (expected: {field.description})"


def _origin(field: str, flags: dict[str, Any], path: Path | None) -> str:
    """Where the value of a setting came from, by the precedence the sources apply."""
    if field in flags:
        return flag_name(field)
    for name in [env_name(field), *([API_KEY_ALIAS] if field == "api_key" else [])]:
        if os.environ.get(name):
            return name
    return f"{field} in {path}" if path else field


def _did_you_mean(key: str, known: dict[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else " (see docs/configuration.md)"


def _holds_secret(annotation: Any) -> bool:
    return annotation is SecretStr or any(_holds_secret(arg) for arg in get_args(annotation))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."

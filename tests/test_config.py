"""Settings: precedence flag > environment > TOML > default, validation, and honest errors."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from pydantic import SecretStr

from notifier.config import (
    ConfigError,
    Route,
    Settings,
    bundled_templates_dir,
    decode_webhook_secrets,
    load_settings,
    standalone_settings,
)

SECRET = "whsec_" + base64.b64encode(b"k" * 24).decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"o" * 32).decode()
SLACK_URL = "https://hooks.slack.com/services/T0/B0/slack-token-123"


@pytest.fixture
def toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Write a TOML config file and point NOTIFIER_CONFIG at it."""

    def write(text: str) -> Path:
        path = tmp_path / "notifier.toml"
        path.write_text(text)
        monkeypatch.setenv("NOTIFIER_CONFIG", str(path))
        return path

    return write


def config_error(flags: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(flags)
    return str(caught.value)


def test_defaults_are_the_contract_table() -> None:
    settings = load_settings()
    assert settings.config is None
    assert settings.api_url == "https://api.chamelaion.com/api"
    assert settings.api_key is None
    assert settings.redis_url is None
    assert settings.key_prefix == "notifier"
    assert settings.poll_interval == 15
    assert settings.page_size == 100
    assert settings.reference_id is None
    assert settings.notify_on == ["completed", "failed"]
    assert settings.notify_existing is False
    assert settings.slack_webhook_url is None
    assert settings.webhook_url is None
    assert settings.webhook_secret is None
    assert settings.templates_dir is None
    assert settings.retry_max_attempts == 10
    assert settings.retry_base_delay == 2
    assert settings.retry_max_delay == 600
    assert settings.delivery_timeout == 10
    assert settings.http_port == 8080
    assert settings.log_format == "text"
    assert settings.routes == []


def _plain(value: object) -> object:
    return value.get_secret_value() if isinstance(value, SecretStr) else value


# One setting of each type: (field, TOML literal, env value, flag value, parsed TOML,
# parsed env, parsed flag).
PRECEDENCE_CASES = [
    ("poll_interval", "3.5", "0.5", "0.1", 3.5, 0.5, 0.1),
    ("page_size", "20", "30", "40", 20, 30, 40),
    ("notify_existing", "true", "false", "true", True, False, True),
    ("key_prefix", '"toml"', "env", "flag", "toml", "env", "flag"),
    ("reference_id", '"batch-t"', "batch-e", "batch-f", "batch-t", "batch-e", "batch-f"),
    (
        "notify_on",
        '["failed"]',
        "completed",
        "queued,processing",
        ["failed"],
        ["completed"],
        ["queued", "processing"],
    ),
    ("api_key", '"key-toml"', "key-env", "key-flag", "key-toml", "key-env", "key-flag"),
    ("log_format", '"json"', "text", "json", "json", "text", "json"),
    (
        "api_url",
        '"http://toml.test/api"',
        "http://env.test/api/",
        "https://flag.test",
        "http://toml.test/api",
        "http://env.test/api",
        "https://flag.test",
    ),
]


@pytest.mark.parametrize("case", PRECEDENCE_CASES, ids=[case[0] for case in PRECEDENCE_CASES])
def test_flag_beats_env_beats_toml_beats_default(
    monkeypatch: pytest.MonkeyPatch, toml, case: tuple[str, str, str, str, object, object, object]
) -> None:
    field, toml_value, env_value, flag_value, from_toml, from_env, from_flag = case
    default = Settings.model_fields[field].default
    assert _plain(getattr(load_settings(), field)) == default

    toml(f"{field} = {toml_value}\n")
    assert _plain(getattr(load_settings(), field)) == from_toml

    monkeypatch.setenv(f"NOTIFIER_{field.upper()}", env_value)
    assert _plain(getattr(load_settings(), field)) == from_env

    assert _plain(getattr(load_settings({field: flag_value}), field)) == from_flag


def test_templates_dir_path_precedence_and_toml_relative_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toml
) -> None:
    for name in ("beside-toml", "from-env", "from-flag"):
        (tmp_path / name).mkdir()
    toml('templates_dir = "beside-toml"\n')
    monkeypatch.chdir("/")
    assert load_settings().templates_dir == tmp_path / "beside-toml"
    monkeypatch.setenv("NOTIFIER_TEMPLATES_DIR", str(tmp_path / "from-env"))
    assert load_settings().templates_dir == tmp_path / "from-env"
    assert load_settings({"templates_dir": str(tmp_path / "from-flag")}).templates_dir == (
        tmp_path / "from-flag"
    )


def test_template_dirs_search_the_configured_directory_before_the_bundled_one(
    tmp_path: Path,
) -> None:
    assert load_settings().template_dirs() == [bundled_templates_dir()]
    settings = load_settings({"templates_dir": str(tmp_path)})
    assert settings.template_dirs() == [tmp_path, bundled_templates_dir()]
    assert (bundled_templates_dir() / "webhook" / "default.json.j2").is_file()


def test_standalone_settings_read_neither_the_environment_nor_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "notifier.toml").write_text("page_size = 7\n")
    monkeypatch.setenv("NOTIFIER_CONFIG", str(tmp_path / "notifier.toml"))
    monkeypatch.setenv("NOTIFIER_POLL_INTERVAL", "bogus")
    monkeypatch.setenv("NOTIFIER_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("CHAMELAION_API_KEY", "from-the-environment")
    settings = standalone_settings(api_key="given", webhook_url="http://127.0.0.1:9/hook")
    assert settings.api_key.get_secret_value() == "given"
    assert (settings.poll_interval, settings.page_size, settings.redis_url) == (15, 100, None)
    assert [route.name for route in settings.routes] == ["webhook"]


def test_config_flag_beats_config_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "env.toml").write_text("page_size = 7\n")
    (tmp_path / "flag.toml").write_text("page_size = 9\n")
    monkeypatch.setenv("NOTIFIER_CONFIG", str(tmp_path / "env.toml"))
    assert load_settings().page_size == 7
    assert load_settings({"config": str(tmp_path / "flag.toml")}).page_size == 9


def test_chamelaion_api_key_is_an_alias_below_notifier_api_key_and_above_toml(
    monkeypatch: pytest.MonkeyPatch, toml
) -> None:
    toml('api_key = "from-toml"\n')
    assert load_settings().api_key.get_secret_value() == "from-toml"
    monkeypatch.setenv("CHAMELAION_API_KEY", "from-alias")
    assert load_settings().api_key.get_secret_value() == "from-alias"
    monkeypatch.setenv("NOTIFIER_API_KEY", "from-notifier")
    assert load_settings().api_key.get_secret_value() == "from-notifier"
    assert load_settings({"api_key": "from-flag"}).api_key.get_secret_value() == "from-flag"


def test_empty_environment_variables_count_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFIER_REDIS_URL", "")
    monkeypatch.setenv("NOTIFIER_POLL_INTERVAL", "")
    settings = load_settings()
    assert settings.redis_url is None
    assert settings.poll_interval == 15


def test_notify_on_accepts_spaces_and_drops_repeats() -> None:
    settings = load_settings({"notify_on": " failed, completed ,failed"})
    assert settings.notify_on == ["failed", "completed"]


def test_routes_come_from_the_toml_file_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFIER_ROUTES", '[{"name": "x", "type": "webhook", "url": "http://a"}]')
    assert load_settings().routes == []


def test_unknown_toml_key_is_rejected_with_a_suggestion(toml) -> None:
    path = toml("poll_intervall = 5\n")
    message = config_error()
    assert "unknown key 'poll_intervall'" in message
    assert str(path) in message
    assert "did you mean 'poll_interval'?" in message


def test_unknown_route_key_is_rejected(toml) -> None:
    toml('[[routes]]\nname = "ops"\ntype = "webhook"\nurl = "http://h.test"\nurls = 1\n')
    message = config_error()
    assert "[[routes]] #1 ('ops')" in message
    assert "unknown key 'urls'" in message
    assert "did you mean 'url'?" in message


def test_a_misspelled_secret_key_is_named_without_its_value(toml) -> None:
    toml(
        'api_kye = "sk-live-LEAK-misspelled"\n'
        f'[[routes]]\nname = "ops"\ntype = "webhook"\nurl = "http://h.test"\nsecrte = "{SECRET}"\n'
    )
    message = config_error()
    assert "unknown key 'api_kye'" in message
    assert "unknown key 'secrte'" in message
    assert "LEAK" not in message
    assert SECRET not in message


def test_a_config_file_cannot_name_another(toml) -> None:
    toml('config = "other.toml"\n')
    assert "cannot name another" in config_error()


def test_unreadable_and_invalid_config_files_are_config_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    message = config_error({"config": str(missing)})
    assert (
        f"cannot read the config file {missing} (named by NOTIFIER_CONFIG or --config)" in message
    )
    assert "cannot read the config file" in config_error({"config": str(tmp_path)})
    broken = tmp_path / "broken.toml"
    broken.write_text("poll_interval = \n")
    message = config_error({"config": str(broken)})
    assert f"{broken} (named by NOTIFIER_CONFIG or --config) is not valid TOML" in message
    assert "line 1" in message
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    assert "is not valid TOML" in config_error({"config": str(binary)})


@pytest.mark.parametrize(
    ("setup", "origin"),
    [
        ({"flag": "abc"}, "--poll-interval = 'abc'"),
        ({"env": "abc"}, "NOTIFIER_POLL_INTERVAL = 'abc'"),
        ({"toml": '"abc"'}, "poll_interval in "),
    ],
)
def test_an_invalid_value_is_named_with_its_origin_value_and_expectation(
    monkeypatch: pytest.MonkeyPatch, toml, setup: dict[str, str], origin: str
) -> None:
    if "toml" in setup:
        toml(f"poll_interval = {setup['toml']}\n")
    if "env" in setup:
        monkeypatch.setenv("NOTIFIER_POLL_INTERVAL", setup["env"])
    flags = {"poll_interval": setup["flag"]} if "flag" in setup else {}
    message = config_error(flags)
    assert origin in message
    assert "'abc'" in message
    assert "valid number" in message
    assert "expected: seconds between poll cycles" in message


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        ({"poll_interval": "0.05"}, "greater than or equal to 0.1"),
        ({"poll_interval": "nan"}, "--poll-interval"),
        ({"page_size": "0"}, "--page-size"),
        ({"notify_on": "completed,done"}, "unknown status 'done'"),
        ({"notify_on": ","}, "at least one status"),
        ({"notify_existing": "maybe"}, "--notify-existing"),
        ({"log_format": "xml"}, "'text' or 'json'"),
        ({"http_port": "70000"}, "--http-port"),
        ({"key_prefix": "a{b}"}, "--key-prefix"),
        ({"api_url": "ftp://api.test"}, "http:// or https://"),
        ({"webhook_url": "not a url"}, "--webhook-url = 'not a url'"),
        ({"redis_url": "http://localhost"}, "redis://, rediss:// or unix://"),
        ({"retry_max_attempts": "0"}, "--retry-max-attempts"),
        ({"retry_base_delay": "-1"}, "--retry-base-delay"),
        ({"delivery_timeout": "0"}, "--delivery-timeout"),
        ({"templates_dir": "/nonexistent/templates"}, "--templates-dir"),
        ({"reference_id": ""}, "--reference-id"),
    ],
)
def test_invalid_values_are_rejected(flags: dict[str, str], fragment: str) -> None:
    assert fragment in config_error(flags)


def test_max_delay_below_base_delay_is_rejected() -> None:
    message = config_error({"retry_base_delay": "30", "retry_max_delay": "10"})
    assert (
        "NOTIFIER_RETRY_MAX_DELAY (10) must be at least NOTIFIER_RETRY_BASE_DELAY (30)" in message
    )


def test_shortcuts_add_the_slack_and_webhook_routes() -> None:
    settings = load_settings(
        {
            "slack_webhook_url": SLACK_URL,
            "webhook_url": "http://hook.test/x",
            "webhook_secret": SECRET,
        }
    )
    slack, webhook = settings.routes
    assert (slack.name, slack.type, slack.url.get_secret_value()) == ("slack", "slack", SLACK_URL)
    assert (webhook.name, webhook.type) == ("webhook", "webhook")
    assert webhook.url.get_secret_value() == "http://hook.test/x"
    assert webhook.secret.get_secret_value() == SECRET
    assert slack.secret is None
    assert slack.statuses == webhook.statuses == ["completed", "failed"]
    assert slack.max_concurrency == webhook.max_concurrency == 4


TWO_ROUTES = f"""
notify_on = ["completed", "failed", "processing"]

[[routes]]
name = "team"
type = "slack"
url = "{SLACK_URL}"
statuses = ["failed"]

[[routes]]
name = "pipeline"
type = "webhook"
url = "https://pipeline.test/hook"
secret = "{SECRET} {OTHER_SECRET}"
headers = {{ "Authorization" = "Bearer header-token" }}
template = "custom/body.json.j2"
reference_id = "order-*"
max_concurrency = 2
"""


def test_toml_routes_are_read_with_every_field(toml) -> None:
    toml(TWO_ROUTES)
    team, pipeline = load_settings().routes
    assert team == Route(name="team", type="slack", url=SLACK_URL, statuses=["failed"])
    assert pipeline.statuses == ["completed", "failed", "processing"]
    assert pipeline.headers["Authorization"].get_secret_value() == "Bearer header-token"
    assert pipeline.template == "custom/body.json.j2"
    assert pipeline.reference_id == "order-*"
    assert pipeline.max_concurrency == 2
    assert decode_webhook_secrets(pipeline.secret.get_secret_value()) == [b"k" * 24, b"o" * 32]


@pytest.mark.parametrize(
    ("statuses", "glob", "status", "reference_id", "accepted"),
    [
        (None, None, "completed", None, True),
        (["failed"], None, "completed", "order-1", False),
        (["failed"], None, "failed", None, True),
        (None, "order-*", "completed", "order-12345-ja", True),
        (None, "order-*", "completed", "Order-1", False),  # globs are case-sensitive
        (None, "order-*", "completed", None, False),  # no reference_id matches no glob
        (None, "*", "completed", None, False),
        (None, "batch-?", "failed", "batch-7", True),
        (["completed"], "batch-[0-9]", "completed", "batch-x", False),
    ],
)
def test_a_route_accepts_its_statuses_and_reference_id_glob(
    statuses: list[str] | None,
    glob: str | None,
    status: str,
    reference_id: str | None,
    accepted: bool,
) -> None:
    route = Route(
        name="r", type="webhook", url="http://127.0.0.1:9/", statuses=statuses, reference_id=glob
    )
    assert route.accepts(status, reference_id) is accepted


def test_webhook_secret_signs_a_toml_route_named_webhook(
    monkeypatch: pytest.MonkeyPatch, toml
) -> None:
    toml(f'[[routes]]\nname = "webhook"\ntype = "webhook"\nurl = "http://h.t"\nsecret = "{SECRET}"')
    monkeypatch.setenv("NOTIFIER_WEBHOOK_SECRET", OTHER_SECRET)
    (route,) = load_settings().routes
    assert route.secret.get_secret_value() == OTHER_SECRET


def test_webhook_secret_without_a_webhook_route_is_rejected() -> None:
    message = config_error({"webhook_secret": SECRET})
    assert "NOTIFIER_WEBHOOK_SECRET is set but there is no route named 'webhook'" in message


def test_webhook_secret_cannot_sign_a_slack_route(toml) -> None:
    toml(f'[[routes]]\nname = "webhook"\ntype = "slack"\nurl = "{SLACK_URL}"\n')
    assert "has type 'slack'" in config_error({"webhook_secret": SECRET})


def test_route_names_are_unique_shortcuts_included(toml) -> None:
    toml(f'[[routes]]\nname = "slack"\ntype = "slack"\nurl = "{SLACK_URL}"\n')
    assert "route name 'slack' is used more than once" in config_error(
        {"slack_webhook_url": SLACK_URL}
    )


def test_route_statuses_must_be_a_subset_of_notify_on(toml) -> None:
    toml('[[routes]]\nname = "q"\ntype = "webhook"\nurl = "http://h.test"\nstatuses = ["queued"]\n')
    message = config_error()
    assert "route 'q': statuses 'queued' are not in notify_on (completed, failed)" in message


@pytest.mark.parametrize(
    ("table", "fragment"),
    [
        ('name = "bad name"', "name = 'bad name'"),
        ('type = "email"', "'slack' or 'webhook'"),
        ('url = "ftp://h.test"', "http:// or https://"),
        ('secret = "plain"', "must start with whsec_"),
        ('secret = "whsec_***"', "must be base64"),
        ('headers = { "Webhook-Signature" = "x" }', "set by the notifier"),
        ('headers = { "User-Agent" = "team-agent/2" }', "set by the notifier"),
        ('headers = { "content-type" = "text/plain" }', "set by the notifier"),
        ('template = "../../etc/passwd"', "relative path inside the template directories"),
        ('template = "/etc/passwd"', "relative path inside the template directories"),
        ("max_concurrency = 0", "max_concurrency = 0"),
        ('reference_id = ""', "reference_id"),
        ('digest = "batch"', "input should be 'reference_id'"),
        ('digest = "reference_id"\ndigest_wait = -1', "digest_wait = -1"),
        ('digest = "reference_id"\ndigest_statuses = ["done"]', "unknown status 'done'"),
        ('digest = "reference_id"\ndigest_template = "../x.j2"', "relative path inside"),
    ],
)
def test_invalid_route_fields_are_rejected_naming_the_route(
    toml, table: str, fragment: str
) -> None:
    fields = {"name": '"ops"', "type": '"webhook"', "url": '"http://h.test"'}
    key = table.split(" = ", maxsplit=1)[0]
    fields[key] = table.split(" = ", 1)[1]
    toml("[[routes]]\n" + "".join(f"{k} = {v}\n" for k, v in fields.items()))
    message = config_error()
    assert "[[routes]] #1" in message
    assert fragment in message


def test_slack_routes_take_no_secret(toml) -> None:
    toml(f'[[routes]]\nname = "s"\ntype = "slack"\nurl = "{SLACK_URL}"\nsecret = "{SECRET}"\n')
    assert "secret is only for webhook routes" in config_error()


def test_missing_route_field_is_named(toml) -> None:
    toml('[[routes]]\nname = "ops"\ntype = "webhook"\n')
    assert "[[routes]] #1 ('ops') in" in config_error()
    assert "url is required" in config_error()


SECRET_VALUES = {
    "api_key": "sk-live-LEAK-api",
    "redis_url": "http://user:LEAK-redis@localhost",
    "slack_webhook_url": "ftp://hooks.slack.com/services/LEAK-slack",
    "webhook_secret": "LEAK-webhook-secret",
}


@pytest.mark.parametrize("field", sorted(SECRET_VALUES))
def test_errors_about_secrets_never_quote_them(monkeypatch: pytest.MonkeyPatch, field: str) -> None:
    monkeypatch.setenv(f"NOTIFIER_{field.upper()}", SECRET_VALUES[field])
    monkeypatch.setenv("NOTIFIER_PAGE_SIZE", "zero")  # an error beside the secret one
    if field == "api_key":  # nothing checks a key's shape: make another setting fail
        monkeypatch.setenv("NOTIFIER_WEBHOOK_SECRET", SECRET)
    message = config_error()
    assert "LEAK" not in message
    assert "'zero'" in message


def test_route_secrets_are_never_quoted(toml) -> None:
    toml(
        '[[routes]]\nname = "ops"\ntype = "slack"\nurl = "ftp://hooks.slack.com/LEAK-url"\n'
        'headers = { "Authorization" = 5 }\n'
        '[[routes]]\nname = "hook"\ntype = "webhook"\nurl = "http://h.test"\n'
        'secret = "LEAK-secret"\n'
    )
    message = config_error()
    assert "url" in message
    assert "secret" in message
    assert "headers" in message
    assert "LEAK" not in message


def test_require_names_the_missing_setting() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings().require("api_key", "notifier run polls the API")
    message = str(caught.value)
    assert message.startswith("NOTIFIER_API_KEY is not set: notifier run polls the API.")
    assert "CHAMELAION_API_KEY" in message
    assert "--api-key" in message
    load_settings({"api_key": "k"}).require("api_key", "unused")


def test_secrets_are_hidden_in_reprs(monkeypatch: pytest.MonkeyPatch, toml) -> None:
    toml(TWO_ROUTES)
    monkeypatch.setenv("NOTIFIER_API_KEY", "sk-live-hidden")
    monkeypatch.setenv("NOTIFIER_REDIS_URL", "redis://:redis-pass@localhost:6379/0")
    text = repr(load_settings()) + str(load_settings())
    for secret in ("sk-live-hidden", "redis-pass", "slack-token-123", SECRET, "header-token"):
        assert secret not in text


def test_decode_webhook_secrets_rejects_empty_lists() -> None:
    with pytest.raises(ValueError, match="at least one"):
        decode_webhook_secrets("   ")
    with pytest.raises(ValueError, match="at least one non-empty"):
        decode_webhook_secrets("whsec_")


def test_a_digest_route_is_read_with_its_options(toml) -> None:
    toml(
        '[[routes]]\nname = "batches"\ntype = "webhook"\nurl = "http://h.test"\n'
        'digest = "reference_id"\ndigest_wait = 12.5\ndigest_interval = 60\n'
        'digest_statuses = ["failed"]\ndigest_template = "mine/batch.json.j2"\n'
    )
    settings = load_settings({"slack_webhook_url": SLACK_URL})
    route, slack = settings.routes
    assert (route.digest, route.digest_wait, route.digest_interval) == ("reference_id", 12.5, 60)
    assert route.digest_statuses == ["failed"]
    assert route.digest_template == "mine/batch.json.j2"
    assert settings.digest_routes == [route]
    assert (slack.digest, slack.digest_wait, slack.digest_interval) == (None, 30, 300)
    assert slack.digest_statuses == []


@pytest.mark.parametrize("option", ["digest_wait = 5", 'digest_statuses = ["failed"]'])
def test_digest_options_without_digest_are_rejected(toml, option: str) -> None:
    toml(f'[[routes]]\nname = "ops"\ntype = "webhook"\nurl = "http://h.test"\n{option}\n')
    message = config_error()
    assert "[[routes]] #1 ('ops')" in message
    assert f"{option.split(' ', maxsplit=1)[0]} only applies to a digest route" in message
    assert 'add digest = "reference_id"' in message


def test_digest_statuses_must_be_statuses_the_route_receives(toml) -> None:
    toml(
        '[[routes]]\nname = "ops"\ntype = "webhook"\nurl = "http://h.test"\n'
        'statuses = ["completed"]\ndigest = "reference_id"\ndigest_statuses = ["failed"]\n'
    )
    assert "route 'ops': digest_statuses 'failed' are not among the statuses the route " in (
        config_error()
    )


@pytest.mark.parametrize(
    ("status", "reference_id", "with_glob", "without_glob"),
    [
        ("completed", "order-1", False, False),  # in a batch: only in its digest
        ("failed", "order-1", True, True),  # in digest_statuses: at once too
        ("completed", None, False, True),  # no batch: one by one, if the glob allows
        ("completed", "misc-1", False, False),
        ("failed", "misc-1", False, True),
    ],
)
def test_a_digest_route_sends_alone_only_requests_outside_batches_or_in_digest_statuses(
    status: str, reference_id: str | None, with_glob: bool, without_glob: bool
) -> None:
    route = Route(
        name="r",
        type="webhook",
        url="http://127.0.0.1:9/",
        digest="reference_id",
        digest_statuses=["failed"],
        reference_id="order-*",
    )
    assert route.accepts(status, reference_id) is with_glob
    assert route.model_copy(update={"reference_id": None}).accepts(status, reference_id) is (
        without_glob
    )
    assert route.digests("order-1")
    assert not route.digests("misc-1")

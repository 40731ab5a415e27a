"""The README and the pages under docs/ stay true: their references match the models, their
example loads, CI runs the README's tests, and every link and table of contents holds."""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydantic_core import PydanticUndefined

from notifier.cli import build_parser
from notifier.config import Route, Settings, env_name, flag_name, load_settings

from samples import API_ERROR_MESSAGES

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CONFIGURATION = DOCS / "configuration.md"
INTEGRATIONS = DOCS / "integrations.md"
DEPLOYMENT = DOCS / "deployment.md"
OPERATIONS = DOCS / "operations.md"
PERFORMANCE = DOCS / "performance.md"
# The user's documentation: the README and every page under docs/, each with its contents.
PAGES = [README, *sorted(DOCS.glob("*.md"))]
# Every Markdown file whose links must hold.
MARKDOWN = [*PAGES, ROOT / "ARCHITECTURE.md"]
# What a fresh clone lacks: local environments, caches and build output.
NOT_IN_A_CHECKOUT = (
    ".git",
    ".venv",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "build",
    "dist",
)


def relative(page: Path) -> str:
    return str(page.relative_to(ROOT))


@functools.cache
def read(page: Path) -> str:
    return page.read_text()


def prose(text: str) -> str:
    """The text without its fenced code blocks, where a `# comment` is not a heading."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def section(title: str, page: Path = README) -> str:
    """A page's text under a heading, up to the next heading of the same or a higher level."""
    text = read(page)
    heading = re.search(rf"^(#+) {re.escape(title)}$", text, re.M)
    assert heading, f"{relative(page)} has no section {title!r}"
    level = len(heading.group(1))
    end = re.compile(rf"^#{{1,{level}}} ", re.M).search(text, heading.end())
    return text[heading.end() : end.start() if end else len(text)]


def first_table(text: str) -> list[list[str]]:
    """The rows of the first Markdown table in the text, header row included."""
    lines = text[text.index("\n| ") + 1 :].splitlines()
    table = [line for line in itertools.takewhile(lambda line: line.startswith("|"), lines)]
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in table
        if not line.startswith("| ---")
    ]


def anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {anchor(heading) for heading in re.findall(r"^#+ (.+)$", prose(read(page)), re.M)}


def shown(value: Any) -> str:
    """A default as the configuration reference writes it."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list | tuple):
        return ",".join(shown(item) for item in value)
    return str(value)


def test_the_documentation_has_the_pages_the_readme_promises() -> None:
    assert {CONFIGURATION, INTEGRATIONS, DEPLOYMENT, OPERATIONS, PERFORMANCE} <= set(PAGES)


@pytest.mark.parametrize("field", [name for name in Settings.model_fields if name != "routes"])
def test_every_setting_is_in_the_configuration_reference(field: str) -> None:
    rows = first_table(section("Configuration reference", CONFIGURATION))
    row = next((row for row in rows if f"`{env_name(field)}`" in row[0]), None)
    assert row is not None, f"{env_name(field)} is missing from the configuration reference"
    assert row[1] == f"`{flag_name(field)}`"


def test_the_reference_lists_no_setting_the_model_lacks() -> None:
    rows = first_table(section("Configuration reference", CONFIGURATION))[1:]
    documented = {re.match(r"`NOTIFIER_(\w+)`", row[0]).group(1).lower() for row in rows}
    assert documented == set(Settings.model_fields) - {"routes"}


# Defaults the reference states in words rather than as a value, and why.
DEFAULTS_IN_WORDS = {
    # No default value: `run`, `once` and `check` refuse to start without a key (the model
    # allows None so that `demo`, `dlq` and `healthcheck` run without one).
    "api_key": "required by `run`, `once`, `check`",
}


@pytest.mark.parametrize("field", [name for name in Settings.model_fields if name != "routes"])
def test_the_references_default_is_the_settings_models(field: str) -> None:
    rows = first_table(section("Configuration reference", CONFIGURATION))
    assert rows[0][2] == "default"
    (row,) = (row for row in rows if row[0].startswith(f"`{env_name(field)}`"))
    if field in DEFAULTS_IN_WORDS:
        assert row[2] == DEFAULTS_IN_WORDS[field]
        return
    default = Settings.model_fields[field].default
    expected = shown(default)
    assert row[2] == (expected if default is None else f"`{expected}`"), env_name(field)


# Route keys whose default the routes reference states in words, and why.
ROUTE_DEFAULTS_IN_WORDS = {
    # None in the model: the route's type picks the bundled template.
    "template": "per type",
    "digest_template": "per type",
    # None in the model: Settings fills in notify_on when it validates the routes.
    "statuses": "all of `notify_on`",
}


@pytest.mark.parametrize("key", list(Route.model_fields))
def test_the_routes_references_default_is_the_route_models(key: str) -> None:
    rows = first_table(section("Routes", CONFIGURATION))
    assert rows[0][1] == "default"
    (row,) = (row for row in rows if row[0] == f"`{key}`")
    field = Route.model_fields[key]
    if key in ROUTE_DEFAULTS_IN_WORDS:
        expected = ROUTE_DEFAULTS_IN_WORDS[key]
    elif field.default_factory is not None:
        expected = f"`{field.default_factory()!r}`"  # {} and [] read the same in TOML
    elif field.default is PydanticUndefined:
        expected = "required"
    elif field.default is None:
        expected = "unset"
    else:
        expected = f"`{shown(field.default)}`"
    assert row[1] == expected, key


def test_every_route_key_is_in_the_routes_reference() -> None:
    rows = first_table(section("Routes", CONFIGURATION))[1:]
    assert {row[0].strip("`") for row in rows} == set(Route.model_fields)


def test_the_example_config_loads(tmp_path: Path) -> None:
    example = re.search(r"```toml\n(.*?)```", section("Routes", CONFIGURATION), re.S).group(1)
    (tmp_path / "notifier.toml").write_text(example)
    settings = load_settings({"config": str(tmp_path / "notifier.toml")})
    assert [route.name for route in settings.routes] == ["dubbing-team", "pipeline", "batches"]
    assert settings.routes[2].digest == "reference_id"


def test_the_commands_table_lists_every_command_of_the_cli() -> None:
    def commands(parser: argparse.ArgumentParser) -> set[str]:
        (subparsers,) = (
            action for action in parser._actions if isinstance(action, argparse._SubParsersAction)
        )
        return {
            f"{command} {sub}".strip()
            for command, subparser in subparsers.choices.items()
            for sub in (
                commands(subparser)
                if any(isinstance(a, argparse._SubParsersAction) for a in subparser._actions)
                else {""}
            )
        }

    rows = first_table(section("Commands"))[1:]
    listed = {
        " ".join(filter(None, match))
        for row in rows
        for match in re.findall(r"`notifier ([a-z-]+)(?: ([a-z-]+))?", row[0])
    }
    assert listed == commands(build_parser())


def test_ci_runs_exactly_the_readme_test_command() -> None:
    block = re.search(r"```sh\n(.*?)```", section("Run the tests"), re.S).group(1)
    command = block.strip().splitlines()[-1]
    assert command.startswith("pytest")
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in ci_lines


def test_the_troubleshooting_table_explains_every_error_message_of_the_api() -> None:
    table = " ".join(row[0] for row in first_table(section("Troubleshooting", OPERATIONS)))
    for message in API_ERROR_MESSAGES:
        assert message in table, f"Troubleshooting does not explain {message!r}"


def test_every_file_the_documentation_names_exists() -> None:
    pattern = r"`((?:deploy/|docker-compose|Dockerfile)[^`\s]*)`"
    assert {"Dockerfile", "docker-compose.yml", "deploy/notifier.toml"} <= set(
        re.findall(pattern, read(DEPLOYMENT))
    )
    for page in PAGES:
        for path in re.findall(pattern, read(page)):
            assert (ROOT / path).exists(), f"{relative(page)} names {path}, which does not exist"


@pytest.mark.timeout(600)
def test_the_quick_start_works_as_written_in_a_fresh_checkout(tmp_path: Path) -> None:
    # Install, then the demo, copy-pasted into a shell, as a newcomer would: a fresh
    # virtual environment, dependencies from the package index, nothing of this checkout's.
    block = re.search(r"```sh\n(.*?)```", section("Quick start"), re.S).group(1)
    assert block.splitlines() == [
        "python3 -m venv .venv && . .venv/bin/activate && pip install .",
        "notifier demo",
    ]
    checkout = tmp_path / "chamelaion-notifier"
    shutil.copytree(ROOT, checkout, ignore=shutil.ignore_patterns(*NOT_IN_A_CHECKOUT))
    environment = {
        name: value
        for name, value in os.environ.items()
        if name not in {"VIRTUAL_ENV", "PYTHONPATH"} and not name.startswith("NOTIFIER_")
    }
    environment["PATH"] = os.pathsep.join(
        part for part in environment["PATH"].split(os.pathsep) if "/.venv/" not in part + "/"
    )
    result = subprocess.run(
        ["bash", "-e", "-c", block],
        cwd=checkout,
        env=environment,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "✅ LIP SYNC COMPLETED" in result.stdout
    assert "❌ LIP SYNC FAILED" in result.stdout
    assert '"type": "lipsync.request.failed"' in result.stdout


@pytest.mark.parametrize("page", MARKDOWN, ids=relative)
def test_every_link_inside_the_documentation_points_at_a_file_and_heading(page: Path) -> None:
    # GitHub's anchors: lower case, punctuation dropped, spaces turned into hyphens.
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(read(page))):
        if re.match(r"[a-z]+:", target):
            continue  # https://…, mailto:…: outside the repository
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{relative(page)} links {target}, and there is no {path}"
        if fragment:
            assert linked.suffix == ".md", f"{relative(page)} links {target}, an anchor in no page"
            assert fragment in anchors(linked), f"{relative(page)} links {target}: no such heading"


@pytest.mark.parametrize("page", PAGES, ids=relative)
def test_the_table_of_contents_lists_every_section_in_order(page: Path) -> None:
    headings = re.findall(r"^(##+) (.+)$", prose(read(page)), re.M)
    expected = [
        f"{'  ' * (len(marks) - 2)}- [{title}](#{anchor(title)})"
        for marks, title in headings
        if len(marks) <= 3 and title != "Contents"
    ]
    listed = section("Contents", page).strip().splitlines()
    assert listed == expected


@pytest.mark.parametrize("page", PAGES[1:], ids=relative)
def test_each_docs_page_opens_with_its_title_a_sentence_and_its_contents(page: Path) -> None:
    paragraphs = read(page).split("\n\n")
    assert re.fullmatch(r"# \S.*", paragraphs[0]), f"{relative(page)} does not start with a title"
    sentence = " ".join(paragraphs[1].splitlines())
    assert not sentence.startswith("#")
    assert sentence.endswith(".")
    assert sentence.count(". ") == 0, f"{relative(page)} opens with more than one sentence"
    assert paragraphs[2] == "## Contents"


def test_the_readme_points_at_every_docs_page_and_the_architecture() -> None:
    linked = set(re.findall(r"\]\(([^)#]+)\)", section("Where to read on")))
    assert linked == {relative(page) for page in PAGES[1:]} | {"ARCHITECTURE.md"}

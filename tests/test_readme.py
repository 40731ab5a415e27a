"""The README stays true: its references match the models, its example loads, CI runs its tests."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from notifier.config import Route, Settings, env_name, flag_name, load_settings

from samples import API_ERROR_MESSAGES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
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


def section(title: str) -> str:
    """The README text under a heading, up to the next heading of the same or a higher level."""
    heading = re.search(rf"^(#+) {re.escape(title)}$", README, re.M)
    assert heading, f"README has no section {title!r}"
    level = len(heading.group(1))
    end = re.compile(rf"^#{{1,{level}}} ", re.M).search(README, heading.end())
    return README[heading.end() : end.start() if end else len(README)]


def first_table(text: str) -> list[list[str]]:
    """The rows of the first Markdown table in the text, header row included."""
    lines = text[text.index("\n| ") + 1 :].splitlines()
    table = [line for line in itertools.takewhile(lambda line: line.startswith("|"), lines)]
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in table
        if not line.startswith("| ---")
    ]


@pytest.mark.parametrize("field", [name for name in Settings.model_fields if name != "routes"])
def test_every_setting_is_in_the_configuration_reference(field: str) -> None:
    rows = first_table(section("Configuration reference"))
    row = next((row for row in rows if f"`{env_name(field)}`" in row[0]), None)
    assert row is not None, f"{env_name(field)} is missing from the configuration reference"
    assert row[1] == f"`{flag_name(field)}`"


def test_the_reference_lists_no_setting_the_model_lacks() -> None:
    rows = first_table(section("Configuration reference"))[1:]
    documented = {re.match(r"`NOTIFIER_(\w+)`", row[0]).group(1).lower() for row in rows}
    assert documented == set(Settings.model_fields) - {"routes"}


def test_every_route_key_is_in_the_routes_reference() -> None:
    rows = first_table(section("Routes"))[1:]
    assert {row[0].strip("`") for row in rows} == set(Route.model_fields)


def test_the_example_config_loads(tmp_path: Path) -> None:
    example = re.search(r"```toml\n(.*?)```", section("Routes"), re.S).group(1)
    (tmp_path / "notifier.toml").write_text(example)
    settings = load_settings({"config": str(tmp_path / "notifier.toml")})
    assert [route.name for route in settings.routes] == ["dubbing-team", "pipeline", "batches"]
    assert settings.routes[2].digest == "reference_id"


def test_ci_runs_exactly_the_readme_test_command() -> None:
    block = re.search(r"```sh\n(.*?)```", section("Run the tests"), re.S).group(1)
    command = block.strip().splitlines()[-1]
    assert command.startswith("pytest")
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in ci_lines


def test_the_troubleshooting_table_explains_every_error_message_of_the_api() -> None:
    table = " ".join(row[0] for row in first_table(section("Troubleshooting")))
    for message in API_ERROR_MESSAGES:
        assert message in table, f"Troubleshooting does not explain {message!r}"


def test_every_file_the_deployment_section_names_exists() -> None:
    named = set(re.findall(r"`((?:deploy/|docker-compose|Dockerfile)[^`\s]*)`", README))
    assert {"Dockerfile", "docker-compose.yml", "deploy/notifier.toml"} <= named
    for path in named:
        assert (ROOT / path).exists(), f"the README names {path}, which does not exist"


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


def test_every_link_inside_the_readme_points_at_a_heading() -> None:
    # GitHub's anchors: lower case, punctuation dropped, spaces turned into hyphens.
    headings = re.findall(r"^#+ (.+)$", README, re.M)
    anchors = {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}
    for target in re.findall(r"\]\(#([^)]+)\)", README):
        assert target in anchors, f"no heading for the link #{target}"


def anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def test_the_table_of_contents_lists_every_section_in_order() -> None:
    headings = re.findall(r"^(##+) (.+)$", README, re.M)
    expected = [
        f"{'  ' * (len(marks) - 2)}- [{title}](#{anchor(title)})"
        for marks, title in headings
        if len(marks) <= 3 and title != "Contents"
    ]
    listed = section("Contents").strip().splitlines()
    assert listed == expected

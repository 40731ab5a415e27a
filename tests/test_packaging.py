"""A non-editable install works on its own: the wheel carries the templates and the entry points."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = sorted(
    path.relative_to(ROOT / "templates").as_posix() for path in (ROOT / "templates").rglob("*.j2")
)


def run(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, check=True, **kwargs)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built offline from this checkout."""
    out = tmp_path_factory.mktemp("wheel")
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(out),
        str(ROOT),
    )
    (built,) = out.glob("chamelaion_notifier-*.whl")
    return built


def test_the_bundled_templates_exist() -> None:
    assert "webhook/default.json.j2" in BUNDLED


def test_the_wheel_contains_every_template_inside_the_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    for template in BUNDLED:
        assert f"notifier/templates/{template}" in names
    assert "notifier/cli.py" in names
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    assert "notifier = notifier.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_an_installed_wheel_finds_its_templates_and_runs(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    run(
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-index",
        "--target",
        str(target),
        str(wheel),
    )
    # Only the install target holds `notifier`: the checkout is not on the path.
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = (
        "import notifier, notifier.config as c; "
        "print(notifier.__file__); print(c.bundled_templates_dir())"
    )
    module_file, templates = run(
        sys.executable, "-c", probe, env=env, cwd=tmp_path
    ).stdout.splitlines()
    assert module_file.startswith(str(target))
    assert Path(templates) == target / "notifier" / "templates"
    for template in BUNDLED:
        assert (Path(templates) / template).is_file()
    assert (
        "usage: notifier"
        in run(sys.executable, "-m", "notifier", "--help", env=env, cwd=tmp_path).stdout
    )
    assert (
        "usage: notifier"
        in run(str(target / "bin" / "notifier"), "--help", env=env, cwd=tmp_path).stdout
    )


def test_a_source_checkout_finds_the_top_level_templates(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    probe = "import notifier.config as c; print(c.__file__); print(c.bundled_templates_dir())"
    module_file, templates = run(sys.executable, "-c", probe, env=env, cwd=tmp_path).stdout.split()
    assert Path(module_file).parent == ROOT / "notifier"
    assert Path(templates) == ROOT / "templates"

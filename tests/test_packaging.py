"""A non-editable install works on its own: the wheel carries the templates and the entry points,
and a fresh virtualenv set up as the Dockerfile sets up the image runs the service; the image's
HEALTHCHECK command probes the port the settings give."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import tomllib
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from notifier.simulator import Simulator

from conftest import eventually, free_port
from samples import SIMULATOR_KEY

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"
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


def locked() -> dict[str, str]:
    """constraints.txt as normalised name -> pinned version."""
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonical(name)] = version
    return pins


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_lock_pins_every_dependency_and_test_dependency_to_one_version() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    pins = locked()
    for requirement in wanted:
        name = canonical(re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0])
        assert re.fullmatch(r"\d+(\.\d+)*(\.?post\d+)?", pins.get(name, "")), requirement
    assert "pip" in pins  # .ci/run upgrades pip to the version the lock was made with


def test_ci_and_the_image_install_with_the_lock() -> None:
    for path in (ROOT / ".ci" / "run", ROOT / "Dockerfile"):
        text = path.read_text().replace("\\\n", " ")
        installs = [line for line in text.splitlines() if re.search(r"pip (install|wheel)", line)]
        assert installs, path
        for line in installs:
            assert "constraint constraints.txt" in line, f"{path.name}: {line.strip()}"


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


def healthcheck_command() -> list[str]:
    """The Dockerfile's HEALTHCHECK command (its exec form after CMD)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    (line,) = (line for line in text.splitlines() if line.startswith("HEALTHCHECK"))
    return json.loads(line.partition(" CMD ")[2])


def healthcheck_with(notifier: list[str]) -> list[str]:
    """The HEALTHCHECK command with its `notifier` program replaced by `notifier`."""
    program, *args = healthcheck_command()
    assert program == "notifier"
    return [*notifier, *args]


@contextlib.contextmanager
def serving_healthz(status: int) -> Iterator[tuple[int, list[str]]]:
    """A tiny HTTP server on a free 127.0.0.1 port that answers /healthz with `status`:
    its port, and the paths it was asked for."""
    asked: list[str] = []

    class Healthz(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(status if self.path == "/healthz" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: the test reads `asked`."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Healthz)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], asked
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def image_healthcheck(config: Path) -> subprocess.CompletedProcess[str]:
    """The image's HEALTHCHECK command, run from this checkout with NOTIFIER_CONFIG naming
    `config` and no other setting in the environment."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("NOTIFIER_", "CHAMELAION_"))
    }
    env |= {"NOTIFIER_CONFIG": str(config), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        healthcheck_with([sys.executable, "-m", "notifier"]),
        env=env,
        cwd=config.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(("status", "exit_code"), [(200, 0), (204, 0), (503, 1)])
def test_the_image_healthcheck_judges_healthz_on_the_http_port_of_the_toml_file(
    tmp_path: Path, status: int, exit_code: int
) -> None:
    with serving_healthz(status) as (port, asked):
        config = tmp_path / "notifier.toml"
        config.write_text(f"http_port = {port}\n")  # the only setting: no API key, no route
        result = image_healthcheck(config)
    assert result.returncode == exit_code, result.stdout + result.stderr
    assert asked == ["/healthz"]
    assert f"http://127.0.0.1:{port}/healthz" in result.stdout + result.stderr


def test_the_image_healthcheck_fails_when_nothing_listens_on_the_http_port_of_the_toml_file(
    tmp_path: Path,
) -> None:
    port = free_port()
    config = tmp_path / "notifier.toml"
    config.write_text(f"http_port = {port}\n")
    result = image_healthcheck(config)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"http://127.0.0.1:{port}/healthz" in result.stderr


def test_the_image_healthcheck_passes_when_the_toml_file_turns_the_http_server_off(
    tmp_path: Path,
) -> None:
    config = tmp_path / "notifier.toml"
    config.write_text("http_port = 0\n")
    result = image_healthcheck(config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "off" in result.stdout


@pytest.mark.timeout(180)  # pip fetches the dependencies from the index: about 10 s here
async def test_a_fresh_venv_set_up_like_the_image_runs_the_service_and_passes_its_healthcheck(
    wheel: Path, tmp_path: Path, simulator: Simulator, api_url: str
) -> None:
    simulator.backfill(5)
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", str(venv))
    python = str(venv / "bin" / "python")
    run(
        python,
        *("-m", "pip", "install", "--disable-pip-version-check", "--quiet"),
        *("--constraint", str(LOCK), str(wheel)),
    )
    notifier = str(venv / "bin" / "notifier")
    assert "usage: notifier" in run(notifier, "--help", cwd=tmp_path).stdout

    # No NOTIFIER_REDIS_URL: the in-memory store. No PYTHONPATH: only the venv is importable.
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    env |= {
        "NOTIFIER_API_URL": api_url,
        "NOTIFIER_API_KEY": SIMULATOR_KEY,
        "NOTIFIER_WEBHOOK_URL": f"http://127.0.0.1:{free_port()}/hooks/lipsync",
        "NOTIFIER_HTTP_PORT": str(free_port()),
    }
    healthcheck = healthcheck_with([notifier])

    async def healthy() -> bool:
        probe = await asyncio.create_subprocess_exec(
            *healthcheck,
            env=env,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return await probe.wait() == 0

    async def up() -> bool:
        assert service.returncode is None, f"notifier run exited:\n{log.read_text()}"
        return await healthy()

    log = tmp_path / "notifier.log"
    with log.open("wb") as output:
        service = await asyncio.create_subprocess_exec(
            notifier, "run", env=env, cwd=tmp_path, stdout=output, stderr=output
        )
    try:
        await eventually(up, "the HEALTHCHECK command passes", timeout=30)
        service.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(service.wait(), timeout=15) == 0, log.read_text()
    finally:
        if service.returncode is None:
            service.kill()
            await service.wait()
    assert not await healthy(), "the HEALTHCHECK passes with nothing listening"

"""The wheel: `python -m build --wheel` from a copy of the checkout holds keyd and nothing else, and
`pip install dist/keyd-*.whl` into a fresh virtualenv gives a keyd that runs and signs."""

from __future__ import annotations

import email
import shutil
import subprocess
import sys
import tomllib
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement

from keyd.ops.dev import BaoServer
from tests.conftest import base_config
from tests.helpers import ROOT

NOT_SOURCES = shutil.ignore_patterns(
    ".venv", "dist", "build", "run", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis", ".git"
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built from a copy, so no build/ or egg-info lands in the checkout."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCES)
    done = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(work / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (built,) = (work / "dist").glob("keyd-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh virtualenv with the wheel and its dependencies (from the package index)."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=True).create(env_dir)
    done = subprocess.run(
        [str(env_dir / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    yield env_dir


def test_wheel_holds_keyd_and_its_metadata_only(wheel: Path) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        dist_info = f"keyd-{project['version']}.dist-info/"
        assert all(name.startswith(("keyd/", dist_info)) for name in names), names
        assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]
        assert {"keyd/cli.py", "keyd/daemon/wiring.py", "keyd/client.py"} <= set(names)
        # Every module of the checkout's package is in it (nothing listed by hand).
        sources = {str(p.relative_to(ROOT)) for p in (ROOT / "keyd").rglob("*.py")}
        assert sources <= set(names), sources - set(names)
        entry_points = archive.read(dist_info + "entry_points.txt").decode()
        assert "keyd = keyd.cli:main" in entry_points
        metadata = email.message_from_bytes(archive.read(dist_info + "METADATA"))

    # Its run-time requirements are pyproject.toml's dependencies, no more (dev extras aside).
    def key(text: str) -> tuple[str, str, str]:
        requirement = Requirement(text)
        return (requirement.name.lower(), str(requirement.specifier), str(requirement.marker or ""))

    required = {key(line) for line in metadata.get_all("Requires-Dist") or [] if "extra ==" not in line}
    assert required == {key(line) for line in project["dependencies"]}


def test_installed_wheel_runs_keyd(
    installed: Path, bao: BaoServer, secret_path: tuple[str, str], keyd_factory: Any
) -> None:
    keyd_bin = installed / "bin" / "keyd"
    python = installed / "bin" / "python"
    version = subprocess.run(
        [str(keyd_bin), "--version"], capture_output=True, text=True, check=True, cwd="/"
    )
    assert version.stdout.startswith("keyd ")
    where = subprocess.run(
        [str(python), "-c", "import keyd; print(keyd.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    )
    assert where.stdout.startswith(str(installed)), where.stdout  # the wheel's keyd, not the checkout's
    path, _ = secret_path
    proc = keyd_factory(base_config(bao, Path("/unused"), path), start=False)
    proc.config["server"]["socket"] = str(proc.workdir / "keyd.sock")
    proc.socket = proc.config["server"]["socket"]
    proc.python = str(python)
    proc.start()
    token = subprocess.run(
        [str(keyd_bin), "token", "--socket", proc.socket, "--user-id", "dave"],
        capture_output=True,
        text=True,
        check=False,
        cwd="/",
    )
    assert token.returncode == 0 and token.stdout.strip().count(".") == 2, token.stderr
    assert "keyd listening on" in proc.logs()

"""The repository root installs as the package `ctun`, editable and not, and nothing else."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*argv: str, cwd: Path | None = None) -> str:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module", autouse=True)
def clean_checkout() -> Iterator[None]:
    """Building from the checkout leaves setuptools' build/ and *.egg-info in it (mypy and
    ruff would then see a second copy of every module): remove what was not there before."""
    made = [ROOT / "build", ROOT / "ctun.egg-info"]
    made = [path for path in made if not path.exists()]
    yield
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT))
    (path,) = out.glob("ctun-*.whl")
    return path


def test_wheel_holds_only_the_ctun_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"ctun", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    for module in ("ctun/__init__.py", "ctun/cli.py", "ctun/core/protocol.py",
                   "ctun/plugins/transport_udp/transport.py", "ctun/vm/agent.py"):
        assert module in names
    assert not [n for n in names if n.startswith("ctun/tests/")]


@pytest.mark.parametrize("editable", [False, True], ids=["wheel", "editable"])
def test_installed_package_runs(tmp_path: Path, wheel: Path, editable: bool) -> None:
    env_dir = tmp_path / "venv"
    # System site-packages provide the dependencies; this test is about the layout.
    venv.create(env_dir, system_site_packages=True, with_pip=True)
    python = str(env_dir / "bin" / "python")
    target = ["-e", str(ROOT)] if editable else [str(wheel)]
    run(python, "-m", "pip", "install", "-q", "--no-deps", *target)
    outside = tmp_path / "elsewhere"  # not the checkout, so only the installed package counts
    outside.mkdir()
    assert run(python, "-m", "ctun", "version", cwd=outside).startswith("ctun ")
    assert run(str(env_dir / "bin" / "ctun"), "version", cwd=outside).startswith("ctun ")
    probe = "import importlib.util as u; print([m for m in ('core','plugins','vm','tui') " \
            "if u.find_spec(m)])"
    assert run(python, "-c", probe, cwd=outside).strip() == "[]"
    run(python, "-c", "import ctun.core.protocol, ctun.plugins.transport_udp", cwd=outside)

"""requirements.lock is checked against pyproject.toml's dependency declarations (.ci/lockfile.py)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    (tmp_path / ".ci").mkdir()
    shutil.copy(REPO / ".ci" / "lockfile.py", tmp_path / ".ci" / "lockfile.py")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copy(REPO / "requirements.lock", tmp_path / "requirements.lock")
    return tmp_path


def lock_check(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(root / ".ci" / "lockfile.py"), "check"], capture_output=True, text=True)


def test_the_committed_lock_matches_pyproject(repo_copy: Path):
    done = lock_check(repo_copy)
    assert done.returncode == 0, done.stderr


def test_a_new_dependency_without_a_new_lock_fails_naming_make_lock(repo_copy: Path):
    pyproject = repo_copy / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"pyyaml>=6,<7",', '"pyyaml>=6,<7",\n    "rich>=13,<15",'))
    done = lock_check(repo_copy)
    assert done.returncode == 1
    assert "run `make lock`" in done.stderr


def test_a_changed_extra_or_range_fails_too(repo_copy: Path):
    pyproject = repo_copy / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"pytest>=8,<10"', '"pytest>=8,<11"'))
    assert lock_check(repo_copy).returncode == 1


def test_settings_outside_the_dependencies_need_no_new_lock(repo_copy: Path):
    pyproject = repo_copy / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace("line-length = 130", "line-length = 120"))
    assert lock_check(repo_copy).returncode == 0


def test_every_direct_dependency_is_pinned_in_the_lock():
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith((" ", "#")):
            name, version = line.split("==")
            pins[Requirement(name).name.lower().replace("_", "-")] = version.strip()
    for text in declared:
        requirement = Requirement(text)
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not in requirements.lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} outside {requirement.specifier}"

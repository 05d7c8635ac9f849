"""requirements.lock against pyproject.toml and the virtual environment.

    python .ci/lockfile.py stamp   record which dependency declarations the lock was made from (make lock)
    python .ci/lockfile.py check   fail when pyproject.toml's dependencies changed after the lock was made
    python .ci/lockfile.py freeze VENV_PYTHON [EXTRA_PIN ...]
                                   fail unless that environment holds exactly the locked set

Standard library only, so that the check runs before any virtual environment exists.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
LOCK = ROOT / "requirements.lock"
STAMP = "# lock inputs sha256: "
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def inputs_digest() -> str:
    """sha256 of what the lock is resolved from: the dependency tables, not the rest of pyproject.toml."""
    data = tomllib.loads(PYPROJECT.read_text())
    project = data.get("project", {})
    inputs = {
        "requires-python": project.get("requires-python"),
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
        "build-system": data.get("build-system", {}).get("requires", []),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_pins(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        match = PIN.match(line.strip())
        if match:
            pins[normalize(match.group(1))] = match.group(2)
    return pins


def stamp() -> int:
    lines = [line for line in LOCK.read_text().splitlines() if not line.startswith(STAMP)]
    header_end = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    lines.insert(header_end, f"{STAMP}{inputs_digest()}")
    LOCK.write_text("\n".join(lines) + "\n")
    print(f"{LOCK.name}: stamped with the dependency declarations of {PYPROJECT.name}")
    return 0


def check() -> int:
    if not LOCK.exists():
        print(f"{LOCK} is missing: run `make lock`", file=sys.stderr)
        return 1
    text = LOCK.read_text()
    recorded = next((line[len(STAMP):].strip() for line in text.splitlines() if line.startswith(STAMP)), None)
    current = inputs_digest()
    if recorded != current:
        print(
            f"{LOCK.name} was not made from the dependencies now in {PYPROJECT.name} "
            f"(lock made from {recorded or 'unknown inputs'}, pyproject.toml now {current}): run `make lock` "
            "and commit requirements.lock",
            file=sys.stderr,
        )
        return 1
    print(f"{LOCK.name}: up to date with {PYPROJECT.name} ({len(locked_pins(text))} packages)")
    return 0


def freeze(python: str, extra_pins: list[str]) -> int:
    expected = locked_pins(LOCK.read_text() + "\n" + "\n".join(extra_pins))
    frozen = subprocess.run([python, "-m", "pip", "freeze", "--all", "--exclude-editable"],
                            capture_output=True, text=True, check=True).stdout
    installed = locked_pins(frozen)
    missing = sorted(f"{name}=={version}" for name, version in expected.items() if installed.get(name) != version)
    extra = sorted(f"{name}=={version}" for name, version in installed.items() if expected.get(name) != version)
    if missing or extra:
        print(f"the environment of {python} differs from {LOCK.name}:", file=sys.stderr)
        for pin in missing:
            print(f"  locked, not installed: {pin}", file=sys.stderr)
        for pin in extra:
            print(f"  installed, not locked: {pin}", file=sys.stderr)
        return 1
    print(f"{python}: {len(installed)} packages, exactly as in {LOCK.name}")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["stamp"]:
        return stamp()
    if argv[:1] == ["check"]:
        return check()
    if argv[:1] == ["freeze"] and len(argv) >= 2:
        return freeze(argv[1], argv[2:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

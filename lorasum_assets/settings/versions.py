"""Code versions from the code alone: each asset's version hashes the source of its module and of
every lorasum module it imports (transitively).

Editing the training loop changes ``lora_adapter``'s version, and Dagster shows it, and everything
downstream, as unsynced. Settings are not code: a run reads its profile when it starts, and the
settings and base model it ran with enter the data versions it writes. So the definitions are the
same whatever ``LORASUM_PROFILE`` said when they were loaded.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

PACKAGE = "lorasum_assets"
# Settings enter through the profile sections passed to ``code_version``, not through profiles.py's source.
NOT_CODE = {f"{PACKAGE}.settings.profiles", f"{PACKAGE}.definitions"}


ROOT = Path(__file__).resolve().parents[1]  # the package


def _source_path(module: str) -> Path | None:
    """The file of a lorasum module; None for names that are not modules (functions, constants)."""
    parts = module.split(".")[1:]
    candidates = [ROOT.joinpath(*parts).with_suffix(".py")] if parts else []
    candidates.append(ROOT.joinpath(*parts, "__init__.py"))
    return next((c for c in candidates if c.is_file()), None)


def _imported(module: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text("utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith(PACKAGE):
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith(PACKAGE))
    return {n for n in names if _source_path(n) is not None} - {module}


@cache
def module_closure(module: str) -> tuple[str, ...]:
    """``module`` and every lorasum module it imports, directly or not."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen or name in NOT_CODE:
            continue
        path = _source_path(name)
        if path is None:
            continue
        seen.add(name)
        todo.extend(_imported(name, path))
    return tuple(sorted(seen))


def code_version(module: str) -> str:
    digest = hashlib.sha256()
    for name in module_closure(module):
        digest.update(name.encode() + b"\0" + _source_path(name).read_bytes())
    return digest.hexdigest()[:16]

"""The shape of the package: no import cycles anywhere, small modules, ``ml/`` grouped by role with
its torch-free modules named and kept so, imports at the top, no dagster in ``ml/``."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lorasum_assets"
ML = PACKAGE / "ml"
# (module under ml/, imported package): optional heavy dependencies imported where they are needed, with a reason
LAZY_IMPORTS_ALLOWED = {("data.readers", "datasets"), ("models.four_bit", "bitsandbytes"), ("export.gguf", "llama_cpp")}
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "bert_score", "accelerate", "trl")


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at module level and inside functions alike.
    ``from a.b import c`` is an edge to ``a.b.c`` when that is a module, else to ``a.b``."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            else:
                continue
            edges |= {t for t in targets if t in files and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done: set[str] = set()
    active: list[str] = []

    def visit(name: str) -> list[str] | None:
        if name in active:
            return active[active.index(name):] + [name]
        if name in done:
            return None
        active.append(name)
        for dependency in sorted(graph.get(name, ())):
            if cycle := visit(dependency):
                return cycle
        active.pop()
        done.add(name)
        return None

    for name in sorted(graph):
        if cycle := visit(name):
            return cycle
    return None


def test_the_package_imports_itself_without_a_cycle():
    cycle = find_cycle(import_graph(PACKAGE))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_sees_a_cycle_through_a_function_level_import(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from pkg.c import g\n")
    (package / "c.py").write_text("from .sub.a import x\n")
    assert find_cycle(import_graph(package)) == ["pkg.c", "pkg.sub.a", "pkg.sub.b", "pkg.c"]


def test_no_module_is_over_400_lines():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert max(sizes.values()) <= 400, sorted(sizes.items(), key=lambda item: -item[1])[:3]


def test_ml_is_grouped_by_role_with_no_loose_modules():
    loose = sorted(p.name for p in ML.glob("*.py"))
    assert loose == ["__init__.py", "progress.py"]
    for package in ML.iterdir():
        if package.is_dir() and package.name != "__pycache__":
            assert (package / "__init__.py").read_text().startswith('"""'), f"ml/{package.name} says what it holds"


ROLE_ORDER = ["data", "models", "training", "generation", "export"]


def test_ml_subpackages_import_only_those_before_them():
    graph = import_graph(PACKAGE)
    for name, edges in graph.items():
        if not name.startswith("lorasum_assets.ml."):
            continue
        role = name.split(".")[2]
        for target in edges:
            if not target.startswith("lorasum_assets.ml.") or target == "lorasum_assets.ml.progress":
                continue
            other = target.split(".")[2]
            if other == role:
                continue
            allowed = ROLE_ORDER[: ROLE_ORDER.index(role)] if role in ROLE_ORDER else []
            assert other in allowed, f"{name} imports {target}: ml/{role} may import {allowed or 'no other subpackage'}"


def torch_free_modules() -> list[str]:
    names = []
    for init in sorted(ML.glob("*/__init__.py")):
        line = re.search(r"^Torch-free: (.*)$", init.read_text(), re.M)
        assert line, f"{init.relative_to(PACKAGE)} names its torch-free modules"
        listed = [] if line.group(1).strip() == "(none)" else [m.strip() for m in line.group(1).split(",")]
        for module in listed:
            assert (init.parent / f"{module}.py").exists(), f"{init.parent.name}/{module}.py"
        names += [f"lorasum_assets.ml.{init.parent.name}.{module}" for module in listed]
    return names + ["lorasum_assets.ml.progress"]


def test_the_modules_said_to_be_torch_free_load_without_torch():
    modules = torch_free_modules()
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules)
    code += f"print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in {set(HEAVY)!r})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(modules) >= 10 and done.stdout.strip() == "", done.stdout


def ml_modules() -> dict[str, ast.Module]:
    return {module_name(p, ML)[len("ml."):]: ast.parse(p.read_text()) for p in ML.rglob("*.py") if p.name != "__init__.py"}


def test_ml_imports_sit_at_the_top_except_optional_heavy_ones_with_a_reason():
    for name, tree in ml_modules().items():
        source = (ML / (name.replace(".", "/") + ".py")).read_text().splitlines()
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    package = (node.module if isinstance(node, ast.ImportFrom) else node.names[0].name).split(".")[0]
                    assert (name, package) in LAZY_IMPORTS_ALLOWED, f"{name}:{node.lineno} imports {package} inside {function.name}"
                    assert source[node.lineno - 2].strip().startswith("#"), f"{name}:{node.lineno}: say why this import waits"


def test_ml_code_does_not_import_dagster():
    for name, tree in ml_modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                assert not (module or "").startswith("dagster"), f"{name} imports {module}"


def test_the_gpu_check_says_so_and_succeeds_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: run benchmarks/gpu_check.sh itself")
    script = PACKAGE.parent / "benchmarks" / "gpu_check.sh"
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (0, "no CUDA device\n")


def test_no_test_module_imports_another_test_module():
    tests = Path(__file__).resolve().parent
    for path in tests.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                target = node.module.removeprefix("lorasum_assets_tests.").removeprefix(".")
                assert not target.startswith("test_"), f"{path.name} imports from {node.module}: move the helper to helpers.py or conftest.py"


def test_the_package_ships_every_subpackage_and_no_tests():
    import tomllib

    from setuptools import find_packages

    pyproject = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    found = find_packages(where=str(PACKAGE.parent), include=pyproject["tool"]["setuptools"]["packages"]["find"]["include"])
    expected = {module_name(p, PACKAGE) for p in PACKAGE.rglob("__init__.py")}
    assert set(found) == expected and not any(name.startswith("lorasum_assets_tests") for name in found)


def test_every_doc_the_code_and_docs_cite_exists():
    cited = set()
    for path in [*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "docs").glob("*.md"), PACKAGE.parent / "README.md"]:
        cited |= set(re.findall(r"\bdocs/[a-z0-9_-]+\.md", path.read_text()))
    missing = sorted(doc for doc in cited if not (PACKAGE.parent / doc).exists())
    assert len(cited) >= 5 and not missing, missing

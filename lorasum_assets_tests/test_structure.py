"""The shape of the pure ML code: no import cycles, small modules, imports at the top, no dagster."""

import ast
from pathlib import Path

ML = Path(__file__).resolve().parents[1] / "lorasum_assets" / "ml"
# (module, imported package): optional heavy dependencies imported where they are needed, with a reason
LAZY_IMPORTS_ALLOWED = {("readers", "datasets"), ("model_setup", "bitsandbytes")}


def modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text()) for p in ML.glob("*.py") if p.stem != "__init__"}


def test_ml_modules_import_each_other_without_a_cycle():
    graph = {}
    for name, tree in modules().items():
        graph[name] = {
            node.module.rsplit(".", 1)[1]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lorasum_assets.ml.")
        }
    done, active = set(), []

    def visit(name):
        assert name not in active, f"import cycle: {' -> '.join(active[active.index(name):] + [name])}"
        if name in done:
            return
        active.append(name)
        for dependency in sorted(graph.get(name, ())):
            visit(dependency)
        active.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_no_ml_module_is_over_350_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in ML.glob("*.py")}
    assert max(sizes.values()) <= 350, sizes


def test_imports_sit_at_the_top_except_optional_heavy_ones_with_a_reason():
    for name, tree in modules().items():
        source = (ML / f"{name}.py").read_text().splitlines()
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    package = (node.module if isinstance(node, ast.ImportFrom) else node.names[0].name).split(".")[0]
                    assert (name, package) in LAZY_IMPORTS_ALLOWED, f"{name}.py:{node.lineno} imports {package} inside {function.name}"
                    assert source[node.lineno - 2].strip().startswith("#"), f"{name}.py:{node.lineno}: say why this import waits"


def test_ml_code_does_not_import_dagster():
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                assert not (module or "").startswith("dagster"), f"{name}.py imports {module}"


def test_the_gpu_check_says_so_and_succeeds_without_a_gpu():
    import subprocess

    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: run benchmarks/gpu_check.sh itself")
    script = ML.parents[1] / "benchmarks" / "gpu_check.sh"
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (0, "no CUDA device\n")

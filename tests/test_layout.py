"""The layout is the architecture: each layer of `bench/` imports only from the layers below it
(lazy imports inside functions included), methods import the kit only, and few modules sit at
the top."""
import ast
from pathlib import Path

from helpers import REPO

# bottom to top; a module may import its own layer and those below
LAYERS = [("errors", "io", "options"), ("distributed",), ("data",), ("model",), ("method",), ("config",),
          ("train",), ("run",), ("study",), ("speed", "api", "cli")]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def bench_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every `bench...` import in a file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "bench":
                out += [(node.lineno, f"bench.{a.name}") for a in node.names]
            elif node.module.startswith("bench."):
                out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("bench.")]
    return out


def layer_of(module: str) -> str:
    return module.split(".")[1]


def test_no_import_runs_back_up_a_layer():
    wrong = []
    for path in sorted((REPO / "bench").rglob("*.py")):
        parts = path.relative_to(REPO / "bench").with_suffix("").parts
        if parts == ("__init__",):
            continue
        mine = RANK[parts[0]]
        for line, module in bench_imports(path):
            if RANK[layer_of(module)] > mine:
                wrong.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_a_method_file_imports_the_kit_only():
    for path in sorted((REPO / "methods").glob("*.py")):
        modules = {m for _, m in bench_imports(path)}
        assert modules <= {"bench.method"}, (path.name, modules)


def test_the_top_of_bench_holds_a_dozen_modules_at_most():
    top = [p.name for p in (REPO / "bench").glob("*.py")]
    assert len(top) <= 12, top
    packages = {p.name for p in (REPO / "bench").iterdir() if (p / "__init__.py").is_file()}
    assert set(RANK) >= {p.stem for p in (REPO / "bench").glob("*.py") if p.stem != "__init__"} | packages

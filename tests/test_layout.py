"""The package layout: each folder is one part, and imports only point down (README, "Code map"); the
recipes share only recipes/base.py."""

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "boft_diffusion"
#: Folder -> level. A module may import its own folder and folders of a lower level only; folders
#: of one level (training and outputs; recipes, evaluation and app) never import each other.
LEVELS = {"core": 0, "tiny": 0, "families": 1, "kinds": 1, "exports": 1, "control": 2, "outputs": 3, "training": 3,
          "recipes": 4, "evaluation": 4, "app": 4}


def package_imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports (anywhere in its body), as dotted names."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = module if parts[-1] == "__init__" else module.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
                names = [f"{target}.{alias.name}" for alias in node.names]
                found |= {n if _exists(n) else target for n in names}
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
        graph[module] = {name for name in found if name.split(".")[0] == "boft_diffusion" and name != module}
    return graph


def _exists(module: str) -> bool:
    relative = Path(*module.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").is_file() or (PACKAGE / relative / "__init__.py").is_file()


def folder(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LEVELS else None


def test_imports_point_down_and_recipes_stay_apart():
    wrong = []
    for module, targets in package_imports().items():
        source = folder(module)
        if source is None:
            continue  # the package's entry points (__init__, demo) sit above every folder
        for target in targets:
            destination = folder(target)
            if destination is None and target != "boft_diffusion":
                wrong.append(f"{module} -> {target} (an entry point)")
            elif destination == source:
                if source == "recipes" and target != "boft_diffusion.recipes.base":
                    wrong.append(f"{module} -> {target} (one recipe imports another; shared steps live in recipes/base.py)")
            elif destination is not None and LEVELS[destination] >= LEVELS[source]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_pure_math_imports_only_torch():
    tree = ast.parse((PACKAGE / "core" / "butterfly.py").read_text())
    roots = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    roots |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert roots - {"__future__", "torch"} <= set(sys.stdlib_module_names)
    assert not any(isinstance(node, ast.ImportFrom) and node.level for node in ast.walk(tree))


def test_no_import_cycles():
    graph = package_imports()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                raise AssertionError("import cycle: " + " -> ".join([*path, module, target]))
            if target not in state:
                visit(target, [*path, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])

"""The package's import graph reads top-down: each part imports only the parts below it, and no
private name (`_x`) is imported from another module."""

import ast
from pathlib import Path

import prge

ROOT = Path(prge.__file__).parent
# bottom to top: a subpackage may import the ones before it (and the small shared modules)
ORDER = ["models", "data", "zo", "run", "engine"]
SHARED = {"prge", "prge.errors", "prge.io", "prge.log"}


def imports(path: Path) -> list[tuple[str, list[str]]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "prge":
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.split(".")[0] == "prge"]
    return out


def module_name(path: Path) -> str:
    parts = ("prge",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part(module: str) -> str | None:
    bits = module.split(".")
    return bits[1] if len(bits) > 2 and bits[1] in ORDER else None


def test_subpackages_import_only_the_parts_below_them():
    bad = []
    for path in ROOT.rglob("*.py"):
        me = part(module_name(path))
        if me is None:
            continue  # the CLI, config and testing sit on top and may import anything
        for target, names in imports(path):
            if target in SHARED:
                continue
            if target == "prge.config" and me in ("run", "engine"):
                continue
            other = part(target) or (part(f"{target}.{names[0]}") if names else None)
            if other is None or ORDER.index(other) > ORDER.index(me):
                bad.append(f"{module_name(path)} imports {target}")
    assert not bad, bad


def test_no_private_name_crosses_a_module():
    crossing = [(module_name(p), t, n) for p in ROOT.rglob("*.py") for t, names in imports(p) for n in names
                if n.startswith("_") and t != module_name(p)]
    assert not crossing, crossing


def test_the_order_is_not_vacuous():
    """Every part exists and the check above sees imports between them."""
    assert all((ROOT / p / "__init__.py").is_file() for p in ORDER)
    seen = {part(t) for p in (ROOT / "run").rglob("*.py") for t, _ in imports(p)}
    assert {"zo", "data", "models"} <= seen

"""The package's import contract (docs/architecture.md) and `import quickloris` staying light.

The layers are read from the ``layers`` block of docs/architecture.md, so the document and this test cannot drift:
one line per level, lowest first; names on one line are siblings. A module may import its own package, any
package of a lower level, and nothing else - no upward import and no sibling import, whether at module level or
inside a function (a lazy import is still a dependency). The module graph must also have no cycle.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "quickloris"


def layers() -> dict[str, int]:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = text.split("```layers\n", 1)[1].split("```", 1)[0]
    return {name: level for level, line in enumerate(block.strip().splitlines()) for name in line.split()}


def modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, module) for every import of a quickloris module in `path`, anywhere in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("quickloris")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("quickloris"):
            for a in node.names:  # `from quickloris.models import surgery` names a module; else the package
                sub = f"{node.module}.{a.name}"
                out.append((node.lineno, sub if sub in known else node.module))
    return out


def package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def graph() -> dict[str, list[tuple[int, str]]]:
    known = modules()
    return {name: imports(path, known) for name, path in known.items()}


def test_no_upward_or_sibling_import():
    level = layers()
    bad, unknown = [], set()
    for name, deps in graph().items():
        mine = package(name)
        if not mine or mine.startswith("_"):  # quickloris/__init__.py, __main__: the top (public names resolve lazily)
            continue
        if mine not in level:
            unknown.add(mine)
            continue
        for line, dep in deps:
            theirs = package(dep)
            if theirs == mine or not theirs or theirs.startswith("_"):  # _native: the C++ core, imports nothing
                continue
            if theirs not in level:
                unknown.add(theirs)
            elif level[theirs] >= level[mine]:
                kind = "sibling" if level[theirs] == level[mine] else "upward"
                bad.append(f"{modules()[name].relative_to(ROOT)}:{line}: {name} imports {dep} ({kind})")
    assert not unknown, f"packages missing from docs/architecture.md's layers block: {sorted(unknown)}"
    assert not bad, "imports against docs/architecture.md's layers:\n" + "\n".join(bad)


def test_no_import_cycle():
    edges = {name: sorted({d for _, d in deps if d != name}) for name, deps in graph().items()}
    # Importing a submodule runs its package's __init__ first; an __init__ importing its own submodules is the
    # usual way of exposing them, not a cycle of design: edges from a package to its own children are skipped.
    edges = {n: [d for d in ds if not d.startswith(n + ".")] for n, ds in edges.items()}
    color: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(n: str) -> None:
        color[n] = 1
        stack.append(n)
        for d in edges.get(n, []):
            if color.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d) :] + [d]))
            elif d in edges and not color.get(d):
                visit(d)
        stack.pop()
        color[n] = 2

    for n in sorted(edges):
        if not color.get(n):
            visit(n)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_layers_block_names_every_package():
    level = layers()
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    packages |= {p.stem for p in SRC.glob("*.py") if not p.stem.startswith("_")}
    assert packages <= set(level), f"add to docs/architecture.md's layers block: {sorted(packages - set(level))}"


@pytest.mark.parametrize("what", ["quickloris", "quickloris.config", "quickloris.cli.main"])
def test_import_stays_light(what):
    """`import quickloris` (and the CLI's entry module) pulls in no transformers / triton / bitsandbytes and
    initialises no CUDA context."""
    code = (
        f"import sys, {what}\n"
        "heavy = sorted(m for m in ('transformers', 'triton', 'bitsandbytes', 'peft', 'datasets', 'trl') "
        "if m in sys.modules)\n"
        "cuda = 'torch' in sys.modules and sys.modules['torch'].cuda.is_initialized()\n"
        "print(heavy, cuda)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] False", out.stdout


def test_config_module_needs_no_torch():
    code = "import sys, quickloris.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"

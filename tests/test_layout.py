"""The house rules that code review alone lets slip: no import cycles, and the README's library
snippet runs as written."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "routertune"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> routertune modules it imports anywhere in its text (top level, inside functions,
    under TYPE_CHECKING): a cycle through a lazy import is still a cycle for the reader."""
    modules = {_module_name(f): f for f in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("routertune"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    graph[name].add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name in modules)
    for name in graph:
        graph[name].discard(name)
        graph[name] &= set(modules)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_import_cycles_are_found():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_another_that_imports_it_back():
    graph = import_graph()
    assert "routertune.routing.attach" in graph and graph["routertune.routing.attach"]  # the scan sees imports
    assert import_cycles(graph) == []


def readme_library_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Library use") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README.md: no python block under 'Library use'"
    return match.group(1)


@pytest.mark.integration
def test_readme_library_snippet_runs_as_written(tmp_path):
    """The snippet, unchanged, in a folder where the quickstart's routers exist (saved here from
    fresh routers, as the quickstart would leave trained ones)."""
    code = readme_library_snippet()
    routers = re.search(r'load_routers\(model, "([^"]+)"\)', code)
    assert routers, "the snippet loads routers from a folder"
    setup = (
        "from routertune import RouterConfig, attach_routers, load_model_and_tokenizer, save_routers\n"
        "model, _ = load_model_and_tokenizer('smollm2-135m-instruct')\n"
        f"save_routers(attach_routers(model, RouterConfig()), {routers.group(1)!r})\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for script in (setup, code):
        done = subprocess.run(
            [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "my_routers" / "routers.safetensors").is_file()
    capacity, kv_bytes = done.stdout.split()[-2:]  # the print's last two values
    assert float(capacity) == 1.0  # fresh routers keep every unit
    assert int(kv_bytes) > 0

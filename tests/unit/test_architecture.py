"""The package's shape, checked: imports run one way between the subpackages, no import
cycles, and only nodestepd/process/ touches the kernel directly. (What the client's launch
paths may load is checked by running them: tests/unit/ctl/test_main.py.)

The rules are read from the source (ast), so a new import or syscall anywhere is checked
without anyone listing it here. Each checker is also shown a violation it must find.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "nodestepd"

# Which subpackages each may import (besides itself). `logs` is the shared logger setup.
ALLOWED = {
    "protocol": {"protocol"},
    "config": {"config"},
    "process": {"process", "logs"},
    "systemd": {"systemd", "process", "logs"},
    "logs": {"systemd"},  # the journal log format
    "step": {"step", "process", "config", "protocol", "logs"},
    "image": {"image", "step", "process", "logs"},  # an image becomes a bundle a step is prepared from
    "daemon": {"daemon", "image", "step", "process", "config", "protocol", "systemd", "logs"},
    "ctl": {"ctl", "image", "protocol", "config", "process", "step", "systemd", "logs"},  # image.refs: the client's REF
    "oci": {"oci", "ctl", "protocol"},  # nodestep-oci: a client, like nodestepctl
    # The asyncio API: a client like nodestepctl, importable without the daemon's dependencies.
    "client": {"client", "protocol"},
    "": {"protocol", "config", "process", "systemd", "logs", "step", "image", "daemon", "ctl",
         "oci", "client"},  # nodestepd/__init__.py
}
# nodestepctl's man page is generated beside nodestepd's, from the daemon's own parser.
# The API parses an image reference as nodestepctl does (image/refs.py is pure, standard library only).
ALLOWED_MODULES = {"nodestepd.ctl.manpage": {"nodestepd.daemon.main"},
                   "nodestepd.client.client": {"nodestepd.image.refs"}}
# What nodestepd.client and the modules it imports may import beyond the standard library:
# nothing (a program imports the API without the daemon's dependencies).
CLIENT_MODULES = ("nodestepd.client", "nodestepd.protocol.wire", "nodestepd.image.refs")

KERNEL_MODULES = {"ctypes", "fcntl"}
KERNEL_ATTRIBUTES = {("os", "pidfd_open"), ("signal", "pidfd_send_signal"), ("socket", "SO_PEERCRED")}
KERNEL_NAMES = {"prctl", "pidfd_open", "pidfd_send_signal", "SO_PEERCRED"}

def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, tree: ast.Module) -> set[str]:
    """Every nodestepd module `name` imports, at any depth of its code (relative ones resolved)."""
    package = name if name.count(".") == 0 or name.endswith("__init__") else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "nodestepd"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] != "nodestepd":
                continue
            for alias in node.names:
                # `from nodestepd.step import record` imports a module; `from x.y import Z` a name of x.y.
                candidate = f"{base}.{alias.name}"
                found.add(candidate if (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").exists()
                          or (PACKAGE.parent / candidate.replace(".", "/")).is_dir() else base)
    found.discard(name)
    return found


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def direction_problems(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if layer(target) in ALLOWED[layer(module)] or target in ALLOWED_MODULES.get(module, ()):
                continue
            if target == "nodestepd":  # __version__
                continue
            problems.append(f"{module} imports {target}: {layer(module) or 'nodestepd'} may not import "
                            f"{layer(target)}")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def kernel_problems(name: str, tree: ast.Module) -> list[str]:
    """Direct kernel access in a module: ctypes/fcntl, pidfd calls, prctl, SO_PEERCRED."""
    problems = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            problems += [f"{name}:{line} imports {a.name}" for a in node.names if a.name.split(".")[0] in KERNEL_MODULES]
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in KERNEL_MODULES:
                problems.append(f"{name}:{line} imports from {node.module}")
            problems += [f"{name}:{line} imports {a.name}" for a in node.names if a.name in KERNEL_NAMES]
        elif isinstance(node, ast.Attribute):
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            if (owner, node.attr) in KERNEL_ATTRIBUTES or node.attr == "prctl":
                problems.append(f"{name}:{line} uses {owner or '...'}.{node.attr}")
    return problems


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return {name: imported(name, tree) for name, tree in modules().items()}


def test_imports_run_one_way(graph):
    assert direction_problems(graph) == []


def test_there_is_no_import_cycle(graph):
    assert cycles(graph) == []


def test_only_process_touches_the_kernel():
    problems = [p for name, tree in modules().items() if layer(name) != "process" for p in kernel_problems(name, tree)]
    assert problems == []


def third_party_imports(tree: ast.Module) -> set[str]:
    """Top-level names of the modules a module imports, at any depth, that are neither the
    standard library nor nodestepd."""
    import sys

    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "nodestepd"}


def test_the_client_api_needs_only_the_standard_library():
    found = {name: third_party_imports(tree) for name, tree in modules().items()
             if name.startswith(CLIENT_MODULES)}
    assert "nodestepd.client.client" in found
    assert {name: names for name, names in found.items() if names} == {}


# ---- the checkers find what they must -------------------------------------------------------


def test_the_checkers_catch_violations():
    graph = {"nodestepd.step.step": {"nodestepd.daemon.registry"}, "nodestepd.daemon.registry": {"nodestepd.step.step"}}
    assert direction_problems(graph) == [
        "nodestepd.step.step imports nodestepd.daemon.registry: step may not import daemon"]
    assert cycles(graph) == [["nodestepd.daemon.registry", "nodestepd.step.step"]]
    source = ast.parse("import fcntl\nimport os, signal, socket\nfrom ctypes import CDLL\n"
                       "def f(s):\n    os.pidfd_open(1)\n    signal.pidfd_send_signal(3, 9)\n"
                       "    s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)\n    libc.prctl(36, 1)\n")
    assert kernel_problems("m", source) == [
        "m:1 imports fcntl", "m:3 imports from ctypes", "m:5 uses os.pidfd_open", "m:6 uses signal.pidfd_send_signal",
        "m:7 uses socket.SO_PEERCRED", "m:8 uses libc.prctl"]
    tree = ast.parse("from nodestepd.step import record\nfrom nodestepd.process.watch import ExitWatch\n"
                     "def f():\n    from . import spec\n")
    assert third_party_imports(ast.parse("import asyncio, msgspec.json\nfrom uvloop import run\n"
                                         "from nodestepd.protocol import wire\n")) == {"msgspec", "uvloop"}
    assert direction_problems({"nodestepd.client.client": {"nodestepd.daemon.session"}}) == [
        "nodestepd.client.client imports nodestepd.daemon.session: client may not import daemon"]
    assert imported("nodestepd.step.step", tree) == {
        "nodestepd.step.record", "nodestepd.process.watch", "nodestepd.step.spec"}

"""The import rule of the package layout, read from the source with ast.

(a) the wire layer (tcprc/wire) does no I/O: it imports
    no socket, select, selectors, threading, _thread, mmap or ssl, not even
    through another tcprc module, and nothing of tcprc outside wire/ but errors;
(b) no import cycle between tcprc modules (imports inside functions count,
    those under `if TYPE_CHECKING:` do not);
(c) each layer imports only the layers below it:
      the base: errors <- addr <- keys <- settings (each only those before it)
      wire -> errors;  engine -> wire, errors, addr, settings
      device, server -> engine, wire, errors, addr, settings (never each other, never ops)
      cluster -> engine, wire, errors, addr, settings (above server: nothing below imports
                 it; it reaches the server only through what cli hands it)
      ops -> errors, addr, settings; device and server only in ops/channels
      cli, demo -> anything
Top-level modules outside the base (cli, demo, __main__) are the wiring.
"""

import ast
import os
from typing import Dict, List, NamedTuple, Set

import pytest

from support import ROOT

PACKAGE = os.path.join(ROOT, "tcprc")
IO_MODULES = {"socket", "select", "selectors", "threading", "_thread", "mmap", "ssl"}
LAYERS = ("wire", "engine", "device", "server", "cluster", "ops")
BASE_ORDER = ("tcprc.errors", "tcprc.addr", "tcprc.keys", "tcprc.settings")
BASE = set(BASE_ORDER)
ALLOWED = {
    "base": {"base"},
    "wire": {"wire"},
    "engine": {"engine", "wire", "base"},
    "device": {"device", "engine", "wire", "base"},
    "server": {"server", "engine", "wire", "base"},
    "cluster": {"cluster", "engine", "wire", "base"},
    "ops": {"ops", "base"},
}
# The agent's wiring: where ops may reach the apps.
CHANNELS = {"tcprc.ops.channels"}


class Import(NamedTuple):
    target: str        # a tcprc module, or a top-level stdlib/third-party name
    line: int


def module_files(root: str = PACKAGE) -> Dict[str, str]:
    """Every tcprc module name -> its file."""
    found = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        rel = os.path.relpath(folder, os.path.dirname(root)).split(os.sep)
        for name in sorted(files):
            if name.endswith(".py"):
                parts = rel + ([] if name == "__init__.py" else [name[:-3]])
                found[".".join(parts)] = os.path.join(folder, name)
    return found


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> List[ast.stmt]:
    """Every import statement, at any depth, except in the body of `if TYPE_CHECKING:`."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        for child in ast.iter_child_nodes(node):
            if isinstance(node, ast.If) and _type_checking(node.test) and child in node.body:
                continue
            todo.append(child)
    return out


def imports_of(module: str, path: str, modules: Set[str]) -> List[Import]:
    with open(path) as handle:
        tree = ast.parse(handle.read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    out = []
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            out += [Import(a.name if a.name.split(".")[0] == "tcprc" else a.name.split(".")[0],
                           node.lineno) for a in node.names]
            continue
        if node.level:
            base = package.split(".")
            base = base[:len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        if source.split(".")[0] != "tcprc":
            out.append(Import(source.split(".")[0], node.lineno))
            continue
        for alias in node.names:
            sub = source + "." + alias.name
            out.append(Import(sub if sub in modules else source, node.lineno))
    unique: Dict[str, Import] = {}
    for imp in out:
        unique.setdefault(imp.target, imp)
    return list(unique.values())


def import_graph(root: str = PACKAGE) -> Dict[str, List[Import]]:
    files = module_files(root)
    return {m: imports_of(m, p, set(files)) for m, p in files.items()}


def layer(module: str) -> str:
    parts = module.split(".")
    if module in BASE:
        return "base"
    if len(parts) > 2 and parts[1] in LAYERS:
        return parts[1]
    if len(parts) == 2 and parts[1] in LAYERS:
        return parts[1]
    return "cli"


def is_package(module: str, graph: Dict[str, List[Import]]) -> bool:
    return any(other.startswith(module + ".") for other in graph)


def cycles(graph: Dict[str, List[Import]]) -> List[List[str]]:
    """The import cycles between tcprc modules: one per strongly connected component."""
    edges = {m: sorted({i.target for i in imps if i.target in graph and i.target != m})
             for m, imps in graph.items()}
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    found = []
    for start in sorted(edges):
        if start in index:
            continue
        # Tarjan's algorithm, iterative: no recursion limit to meet.
        work = [(start, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
            if i < len(edges[node]):
                work.append((node, i + 1))
                nxt = edges[node][i]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


GRAPH = import_graph()


def _cases(modules):
    return [pytest.param(m, id=m) for m in modules]


@pytest.mark.parametrize("module", _cases(m for m in sorted(GRAPH) if layer(m) == "wire"))
def test_the_wire_layer_does_no_io_and_stays_in_wire(module):
    bad = []
    for imp in GRAPH[module]:
        if imp.target in GRAPH and layer(imp.target) != "wire" and imp.target not in ("tcprc.errors", "tcprc") \
                and not is_package(imp.target, GRAPH):
            bad.append("%s imports %s (line %d): outside the wire layer" % (module, imp.target, imp.line))
    # No I/O module, not even through another tcprc module.
    seen, todo = {module}, [module]
    while todo:
        current = todo.pop()
        for imp in GRAPH[current]:
            if imp.target in IO_MODULES:
                bad.append("%s imports %s (line %d)%s" % (current, imp.target, imp.line,
                                                         "" if current == module else ", reached from " + module))
            elif imp.target in GRAPH and imp.target not in seen:
                seen.add(imp.target)
                todo.append(imp.target)
    assert not bad, "\n".join(bad)


def test_there_is_a_wire_layer():
    assert [m for m in GRAPH if layer(m) == "wire"], "no module maps to the wire layer"


def test_no_import_cycles():
    found = cycles(GRAPH)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("module", _cases(m for m in sorted(GRAPH) if layer(m) != "cli"))
def test_each_layer_imports_only_the_layers_below(module):
    mine = layer(module)
    allowed = set(ALLOWED[mine]) | ({"device", "server"} if module in CHANNELS else set())
    bad = []
    for imp in GRAPH[module]:
        if imp.target not in GRAPH or imp.target == "tcprc" or is_package(imp.target, GRAPH):
            continue   # stdlib, or an empty package __init__
        theirs = layer(imp.target)
        if mine == "base":
            if imp.target not in BASE_ORDER[:BASE_ORDER.index(module)]:
                bad.append("%s imports %s (line %d): a base module imports only those before "
                           "it in %s" % (module, imp.target, imp.line, ", ".join(BASE_ORDER)))
        elif theirs not in allowed and imp.target != "tcprc.errors":
            bad.append("%s (%s) imports %s (%s, line %d)" % (module, mine, imp.target, theirs, imp.line))
    assert not bad, "\n".join(bad)


def test_the_pump_never_sees_the_link_not_even_for_typing():
    # PumpThread and run_pump work over a small PumpHost interface; naming
    # Link even under TYPE_CHECKING would be a cycle in all but name.
    pumps = [m for m in GRAPH if m.rpartition(".")[2] == "pump"]
    assert pumps
    for module in pumps:
        with open(module_files()[module]) as handle:
            tree = ast.parse(handle.read())
        named = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(name.rpartition(".")[2] == "link" for name in named), module


def test_the_walk_sees_function_level_imports_and_skips_type_checking(tmp_path):
    # The checks above are only as good as the graph: build one by hand.
    pkg = tmp_path / "tcprc"
    (pkg / "wire").mkdir(parents=True)
    for name in ("__init__.py", "wire/__init__.py", "errors.py"):
        (pkg / name).write_text("")
    (pkg / "wire" / "frames.py").write_text(
        "from typing import TYPE_CHECKING\nfrom .. import errors\n"
        "if TYPE_CHECKING:\n    from ..engine import link\n"
        "def late():\n    import threading\n    from ..engine.link import Link\n")
    (pkg / "engine").mkdir()
    (pkg / "engine" / "__init__.py").write_text("")
    (pkg / "engine" / "link.py").write_text("from ..wire import frames\n")
    graph = import_graph(str(pkg))
    targets = {i.target for i in graph["tcprc.wire.frames"]}
    assert {"tcprc.errors", "threading", "tcprc.engine.link"} <= targets
    assert cycles(graph) == [["tcprc.engine.link", "tcprc.wire.frames"]]
    assert layer("tcprc.wire.frames") == "wire" and layer("tcprc.engine.link") == "engine"
    assert layer("tcprc.ops.channels") == "ops"
    assert layer("tcprc.addr") == "base" and layer("tcprc.cli") == "cli"
    assert layer("tcprc.cluster.registry") == "cluster"


def test_nothing_below_the_cluster_imports_it():
    """device, server, engine, wire, ops and the base never import tcprc.cluster."""
    cluster = [m for m in GRAPH if layer(m) == "cluster"]
    assert cluster, "no cluster package"
    bad = ["%s imports %s (line %d)" % (m, i.target, i.line)
           for m, imps in GRAPH.items() if layer(m) not in ("cluster", "cli")
           for i in imps if i.target.startswith("tcprc.cluster")]
    assert not bad, "\n".join(bad)


# ---- what a type checker sees, and who decides the protocol ------------------------------

def _type_checking_imports(module: str, path: str, modules: Set[str]) -> List[Import]:
    """The tcprc imports in the body of `if TYPE_CHECKING:` blocks of one module."""
    with open(path) as handle:
        tree = ast.parse(handle.read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.If) and _type_checking(node.test)):
            continue
        for stmt in node.body:
            if isinstance(stmt, ast.ImportFrom) and stmt.level:
                base = package.split(".")
                base = base[:len(base) - (stmt.level - 1)]
                source = ".".join(base + ([stmt.module] if stmt.module else []))
            elif isinstance(stmt, ast.ImportFrom):
                source = stmt.module or ""
            else:
                continue
            for alias in stmt.names:
                sub = source + "." + alias.name
                out.append(Import(sub if sub in modules else source, stmt.lineno))
    return out


def test_no_import_for_a_type_checker_points_up_or_closes_a_circle():
    """An import under TYPE_CHECKING is a dependency all the same: it may not point
    to a layer above, nor close a circle (the server's app, link and fleet were one)."""
    files = module_files()
    full = {m: list(GRAPH[m]) + _type_checking_imports(m, p, set(files)) for m, p in files.items()}
    found = cycles(full)
    assert not found, "import cycles counting TYPE_CHECKING: " + "; ".join(
        " <-> ".join(c) for c in found)
    bad = []
    for module, path in files.items():
        mine = layer(module)
        if mine == "cli":
            continue
        allowed = set(ALLOWED[mine]) | ({"device", "server"} if module in CHANNELS else set())
        for imp in _type_checking_imports(module, path, set(files)):
            if imp.target in full and layer(imp.target) not in allowed \
                    and imp.target != "tcprc.errors":
                bad.append("%s imports %s for typing (line %d): %s is above %s"
                           % (module, imp.target, imp.line, layer(imp.target), mine))
    assert not bad, "\n".join(bad)


def test_the_engine_names_no_frame_command():
    """The engine carries out what wire decides: a frame's command (CONNECT, CLOSE,
    DATA, ...) is wire's business, never a name or a number the engine tests."""
    from tcprc.wire.frames import COMMAND_NAMES
    commands = set(COMMAND_NAMES.values())
    bad = []
    for module, path in sorted(module_files().items()):
        if layer(module) != "engine":
            continue
        with open(path) as handle:
            tree = ast.parse(handle.read(), path)
        for node in ast.walk(tree):
            name = node.attr if isinstance(node, ast.Attribute) else \
                node.id if isinstance(node, ast.Name) else None
            if name in commands:
                bad.append("%s line %d names %s" % (module, node.lineno, name))
            if isinstance(node, ast.ImportFrom):
                bad += ["%s line %d imports %s" % (module, node.lineno, a.name)
                        for a in node.names if a.name in commands]
    assert not bad, "\n".join(bad)

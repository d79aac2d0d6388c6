"""Structure figures of the package (issue 23): which modules reach Lightning's or DCP's private names,
import cycles, the longest module and class, and RLModule's constructor arguments.

    .venv/bin/python bench/bench_structure.py [--rev REV]

Private names: a module counts when it imports a ``_name`` from ``lightning`` / ``torch.distributed.checkpoint``,
or reads ``x._name`` where ``_name`` is an attribute or method Lightning (or DCP) defines and the package does not.
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sources(root: Path) -> dict[str, Path]:
    """Module name -> file, for the package and its callbacks folder."""
    out = {}
    for path in sorted((root / "lightrft_lightning").rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        out[".".join(rel.parts).removesuffix(".__init__")] = path
    for path in sorted((root / "callbacks").rglob("*.py")):
        rel = path.relative_to(root / "callbacks").with_suffix("")
        out[".".join(("lightrft_lightning", "callbacks", *rel.parts)).removesuffix(".__init__")] = path
    return out


def private_names(package_dir: Path) -> set[str]:
    """``_names`` defined as attributes or methods in a library's source."""
    names: set[str] = set()
    for path in package_dir.rglob("*.py"):
        text = path.read_text(errors="ignore")
        names.update(re.findall(r"self\.(_[a-z]\w*)\s*[:=]", text))
        names.update(re.findall(r"def (_[a-z]\w*)\(", text))
    return names


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rev", help="measure this git revision (checked out in a temporary directory)")
    args = parser.parse_args()
    root = ROOT
    if args.rev:
        tmp = Path(tempfile.mkdtemp())
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(tmp), args.rev], check=True)
        root = tmp
    try:
        report(root)
    finally:
        if args.rev:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(root)], check=True)


def report(root: Path) -> None:
    import lightning
    import torch.distributed.checkpoint as dcp

    mods = sources(root)
    ours = set()
    for path in mods.values():
        text = path.read_text()
        ours.update(re.findall(r"self\.(_[a-z]\w*)\s*[:=]", text))
        ours.update(re.findall(r"def (_[a-z]\w*)\(", text))
        ours.update(re.findall(r"__dict__\[\"(_[a-z]\w*)\"\]", text))
    ours.update(n for n in dir(__import__("torch").nn.Module) if n.startswith("_"))  # torch's, not Lightning's
    ours.update(vars(__import__("torch").nn.Module()))
    libraries = {"Lightning": (Path(lightning.__file__).parent, ("lightning",)),
                 "DCP": (Path(dcp.__file__).parent, ("torch.distributed.checkpoint",))}
    reach: dict[str, list[str]] = {}
    for lib, (directory, prefixes) in libraries.items():
        names = private_names(directory) - ours
        hits = []
        for name, path in mods.items():
            tree = ast.parse(path.read_text())
            imports = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
                a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            if not any(i.startswith(prefixes) for i in imports):  # another library's attribute of the same name
                continue
            found = False
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(prefixes):
                    found |= any(a.name.startswith("_") for a in node.names)
                elif isinstance(node, ast.Attribute) and node.attr in names:
                    found = True
            if found:
                hits.append(name + " (" + ", ".join(sorted({n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                                                           and n.attr in names})) + ")")
        reach[lib] = hits

    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            # `from pkg import sub` names the submodule; the package's own __init__ runs first in any case
            deps.update(t for t in targets if t in mods and t != name and not (t == node_package(node) and
                                                                                len(targets) > 1))
        graph[name] = deps
    cycles = [c for c in strongly_connected(graph) if len(c) > 1]

    longest_module = max(mods.items(), key=lambda kv: len(kv[1].read_text().splitlines()))
    classes = []
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                classes.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
    rl_args = None
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name == "RLModule":
                init = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
                rl_args = len(init.args.args) - 1 + len(init.args.kwonlyargs)
    print(f"| figure | value ({root}) |\n| --- | --- |")
    for lib, hits in reach.items():
        print(f"| modules reaching {lib} private names | {len(hits)}: {', '.join(hits) or '-'} |")
    print(f"| import cycles | {len(cycles)}: {'; '.join(' <-> '.join(sorted(c)) for c in cycles) or '-'} |")
    print(f"| longest module | {longest_module[0]} ({len(longest_module[1].read_text().splitlines())} lines) |")
    top = sorted(classes, reverse=True)[:3]
    print(f"| longest classes | {', '.join(f'{n} ({l})' for l, n in top)} |")
    print(f"| RLModule constructor arguments | {rl_args} |")


def node_package(node: ast.AST) -> str:
    return getattr(node, "module", "") or ""


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[set[str]] = []
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            out.append(comp)

    for v in graph:
        if v not in index:
            visit(v)
    return out


if __name__ == "__main__":
    main()

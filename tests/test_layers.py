"""The layer contracts of README.md, "Layout": imports run one way, and no module imports itself round a circle.

Read from the source with `ast`, nothing imported: every import counts, those inside functions too (a
lazy import is still an arrow; laziness only moves the cost to first use).
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("pipeline", "cli", "storage_schema", "benchmarks")  # installed as attncache.<folder>

# Bottom to top: a room may import its own modules and any room below it, never one above.
LAYERS = ("storage_schema", "_util", "data", "augment", "teacher", "encodings", "store", "precompute",  # cache side
          "train",  # training side
          "tools", "studies",  # over the two sides
          "benchmarks", "cli")  # entry points
# Arrows the order alone would allow and that must not exist either.
FORBIDDEN = {("train", "precompute"): "training reads stores, it never runs precompute",
             ("store", "teacher"): "the store runs no model (`verify --recompute` lives in tools)"}


def modules(root: Path = ROOT) -> dict[str, ast.Module]:
    """attncache module name -> its parsed source."""
    found = {}
    for folder in FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            parts = ("attncache", *path.relative_to(root).with_suffix("").parts)
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = ast.parse(path.read_text(), filename=str(path))
    return found


def imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The attncache modules `name` imports, at any depth of its code."""
    package = name if any(k.startswith(name + ".") for k in known) else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[:len(package.split(".")) - node.level + 1], *filter(None, [base])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("attncache.") and target != name:
                out.add(target)
    return out


def graph(found: dict[str, ast.Module]) -> dict[str, set[str]]:
    known = set(found)
    return {name: imports(name, tree, known) for name, tree in found.items()}


def room(module: str) -> str:
    parts = module.split(".")
    if parts[1] == "pipeline" and len(parts) > 2:
        return parts[2]
    return parts[1]  # cli, benchmarks, storage_schema; "pipeline" is the package face alone


def layer_violations(edges: dict[str, set[str]]) -> list[str]:
    rank = {r: i for i, r in enumerate(LAYERS)}
    rank["pipeline"] = rank["studies"] + 0.5  # the package face (the public API) hands on names of the rooms;
    # the entry points above it may use it
    bad = []
    for source, targets in sorted(edges.items()):
        for target in sorted(targets):
            a, b = room(source), room(target)
            if a != b and rank[b] >= rank[a]:
                bad.append(f"{source} -> {target}: {a} may not import {b}, which is not below it")
            if (a, b) in FORBIDDEN:
                bad.append(f"{source} -> {target}: {FORBIDDEN[(a, b)]}")
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_module_sits_in_a_known_room():
    unknown = {room(m) for m in modules()} - set(LAYERS) - {"pipeline"}
    assert not unknown, f"rooms missing from LAYERS: {unknown}"


def test_imports_run_down_the_layers():
    assert layer_violations(graph(modules())) == []


def test_no_module_imports_itself_round_a_circle():
    assert cycles(graph(modules())) == []


def test_the_checks_see_a_bad_import_and_a_circle():
    """Not vacuous: the real graph has its arrows, and an upward import or a circle added to it is caught."""
    found = modules()
    edges = graph(found)
    assert sum(map(len, edges.values())) > 150 and edges["attncache.pipeline.train.loop"]
    found["attncache.pipeline.store.extra_check"] = ast.parse(
        "def f():\n    from attncache.pipeline.train.loop import train\n    from attncache.cli.main import cli\n"
        "    import attncache.pipeline.teacher.model\n")
    bad = layer_violations(graph(found))
    assert len([b for b in bad if b.startswith("attncache.pipeline.store.extra_check")]) == 3, bad
    found["attncache.pipeline.data.tar"] = ast.parse(ast.unparse(found["attncache.pipeline.data.tar"])
                                                     + "\nfrom attncache.pipeline.data.shards import iter_shard\n")
    assert ["attncache.pipeline.data.shards", "attncache.pipeline.data.tar"] in cycles(graph(found))


def test_a_cache_side_import_loads_no_training_module():
    """The package face resolves its API names lazily: a Ray teacher actor or `attncache verify`
    that imports the store must not load the training side (nor pay for it)."""
    import subprocess
    import sys

    probe = ("import sys, attncache.pipeline.store.cache, attncache.pipeline.precompute.units; "
             "print([m for m in sys.modules if m.startswith('attncache.pipeline.train')])")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]", loaded
    import attncache.pipeline as api

    assert api.transfer_loss.__module__ == "attncache.pipeline.train.student" and "CacheStore" in dir(api)

"""Production code carries no test hook: the crash tests' kill points live in tests/reliability/faults.py,
which wraps the write stages from outside. Nothing under pipeline/ or cli/ names the old env-var hook
or imports a fault module."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOOK_WORDS = ("ATTNCACHE_FAULT", "fault_point")


def hooks_in(source: str) -> list[str]:
    """What in one module's source is a test hook: the hook's names, or an import of a module named fault(s)."""
    found = [word for word in HOOK_WORDS if word in source]
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [f"{node.module or ''}.{alias.name}" for alias in node.names] + [node.module or ""]
        found += [f"import {n}" for n in names if n.rsplit(".", 1)[-1] in ("fault", "faults")]
    return found


def test_no_module_under_pipeline_or_cli_holds_a_test_hook():
    modules = sorted(p for folder in ("pipeline", "cli") for p in (ROOT / folder).rglob("*.py"))
    assert len(modules) > 50
    hooks = {str(p.relative_to(ROOT)): h for p in modules if (h := hooks_in(p.read_text()))}
    assert hooks == {}
    assert not (ROOT / "pipeline" / "_util" / "fault.py").exists()


def test_the_check_catches_each_kind_of_hook():
    assert hooks_in("import os\nos.environ.get('ATTNCACHE_FAULT')\n") == ["ATTNCACHE_FAULT"]
    assert hooks_in("from attncache.pipeline._util.fault import fault_point\n") == [
        "fault_point", "import attncache.pipeline._util.fault"]
    assert hooks_in("from ..fault import kill\n") == ["import fault"]
    assert hooks_in("from attncache.pipeline._util import fault\n") == ["import attncache.pipeline._util.fault"]
    assert hooks_in("import faults\n") == ["import faults"]
    assert hooks_in("from attncache.pipeline._util import atomic\n") == []

"""The wheel installs one import namespace, `attncache`, and nothing beside it."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _wheel_names(tmp_path: Path) -> list[str]:
    """Built from a copy of the tree: a stale build/ folder of an earlier layout would otherwise leak into it."""
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                                 "demo_out", "bench_out", "repro_out"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("attncache-*.whl")
    return zipfile.ZipFile(wheel).namelist()


def test_the_wheel_holds_only_the_attncache_namespace_and_its_dist_info(tmp_path):
    names = _wheel_names(tmp_path)
    tops = {name.split("/")[0] for name in names}
    assert {top for top in tops if top.endswith(".dist-info")} and all(
        top == "attncache" or (top.startswith("attncache-") and top.endswith(".dist-info")) for top in tops), tops
    # every package folder of the tree is in it, schemas included, and the console script names the namespace
    for folder in ("pipeline", "cli", "storage_schema", "benchmarks"):
        for init in (ROOT / folder).rglob("__init__.py"):
            assert f"attncache/{init.relative_to(ROOT).as_posix()}" in names
    assert {"attncache/storage_schema/store_v2.json", "attncache/storage_schema/README.md"} <= set(names)
    # the recipes `train -c NAME` resolves (issue 16 item 2)
    shipped = {f"attncache/cli/configs/{p.name}" for p in (ROOT / "cli" / "configs").glob("*.yaml")}
    assert {"attncache/cli/configs/paper-distill.yaml", "attncache/cli/configs/paper-copy.yaml"} <= shipped <= set(names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    with zipfile.ZipFile(next(tmp_path.glob("attncache-*.whl"))) as wheel:
        assert "attncache = attncache.cli.main:cli" in wheel.read(entry_points).decode()

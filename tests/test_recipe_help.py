"""The recipe grammar where users look (issue 16 item 3): `precompute --help` lists every augmentation
op with its arguments and defaults, from a torch-free mirror (cli/defaults.py) of the op table."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from help_pages import render  # noqa: E402


def test_the_help_mirror_is_the_op_table():
    from attncache.cli import defaults as D
    from attncache.pipeline.augment.ops import OPS
    from attncache.pipeline.augment.spec import PRESETS

    assert [name for name, _, _ in D.RECIPE_OPS] == list(OPS)
    for name, args, what in D.RECIPE_OPS:
        assert args == OPS[name].defaults and list(args) == list(OPS[name].defaults), name
        assert all(type(v) is type(OPS[name].defaults[k]) for k, v in args.items()), name
        assert what
    assert dict(D.RECIPE_PRESETS) == PRESETS


def test_precompute_help_lists_every_op_with_its_arguments_and_defaults():
    from attncache.cli import defaults as D

    page, heavy = render(["precompute"])
    assert heavy == []
    flat = " ".join(page.split())  # click wraps lines: compare without the line breaks
    for name, args, _ in D.RECIPE_OPS:
        signature = f"{name}(" + ", ".join(f"{k}={D._literal(v)}" for k, v in args.items()) + ")"
        assert signature in flat, signature
        for key in args:
            assert f"{key}=" in flat
    assert "erase(p=0.25, scale=(0.02,0.3333), ratio=(0.3,3.3))" in flat
    assert "randaug(n=2, m=9.0, mstd=0.5, p=0.5, inc=1, mmax=10.0, mean=teacher, interpolation=teacher)" in flat
    for name, _ in D.RECIPE_PRESETS:
        assert f"{name}: " in flat

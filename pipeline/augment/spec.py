"""Recipe text to op specs: the grammar of `rrc|flip|randaug(n=2,m=9)|normalize|erase(p=0.25)`, the
presets, and the rules on op order that every recipe, parsed or read back from a store, must keep.

Arguments are `name=literal` pairs (read with `ast.literal_eval`, never evaluated); each op's
missing arguments are filled from its defaults and the teacher's `RecipeDefaults`, so the stored
spec is explicit and the cache id does not depend on which defaults were typed.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass

from attncache.pipeline._util.spec_error import SpecError
from attncache.pipeline.augment.ops import OPS, RecipeDefaults

PRESETS = {"train": "rrc(scale=(0.08,1.0))|flip|randaug(n=2,m=9,mstd=0.5,inc=1)|normalize|erase(p=0.25)",
           "eval": "resize|center_crop|normalize"}
PRESETS["train_mix"] = PRESETS["train"] + "|mix"


def freeze(value):
    """Lists (as JSON gives them back) to tuples, so an OpSpec is hashable and compares equal either way."""
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


@dataclass(frozen=True)
class OpSpec:
    """One op of a recipe with every argument explicit, sorted by name (what the store records)."""

    name: str
    args: tuple[tuple[str, object], ...]

    @property
    def kwargs(self) -> dict:
        return dict(self.args)


def check_ops(ops: tuple[OpSpec, ...]) -> None:
    """Raise SpecError for unknown ops or ops out of order (see the module docstring of ops.py on stages)."""
    names = [op.name for op in ops]
    unknown = [n for n in names if n not in OPS]
    if unknown:
        raise SpecError(f"unknown augmentation op {unknown[0]!r}; known: {sorted(OPS)}")
    if names.count("normalize") != 1:
        raise SpecError(f"a recipe needs exactly one 'normalize' op (got {names.count('normalize')}): {names}")
    pairs = [i for i, n in enumerate(names) if OPS[n].stage == "pair"]
    if len(pairs) > 1 or (pairs and pairs[0] != len(names) - 1):
        raise SpecError(f"op {names[pairs[0]]!r} mixes pairs of samples: at most one, as the last op: {names}")
    cut = names.index("normalize")
    late = [n for n in names[:cut] if OPS[n].stage == "tensor"]
    early = [n for n in names[cut + 1:] if OPS[n].stage == "pil"]
    if late:
        raise SpecError(f"op {late[0]!r} works on tensors and must come after 'normalize'")
    if early:
        raise SpecError(f"op {early[0]!r} works on PIL images and must come before 'normalize'")
    if not any(n in ("rrc", "center_crop") for n in names[:cut]):
        raise SpecError("a recipe must fix the output size with 'rrc' or 'center_crop' before 'normalize'")


def parse_op(text: str, defaults: RecipeDefaults) -> OpSpec:
    """`name` or `name(k=literal, ...)`: unknown names and arguments are refused with what is known."""
    name, given = split_op(text)
    op = OPS[name]
    args = op.fill({**op.defaults, **given}, defaults)
    return OpSpec(name, tuple(sorted((k, freeze(v)) for k, v in args.items())))


def split_op(text: str) -> tuple[str, dict]:
    """An op's name and the arguments typed (not filled from defaults: those need a teacher)."""
    text = text.strip()
    name, _, rest = text.partition("(")
    name = name.strip()
    if name not in OPS:
        raise SpecError(f"unknown augmentation op {name!r}; known: {sorted(OPS)}")
    given = {}
    if rest:
        if not rest.endswith(")"):
            raise SpecError(f"op {name!r}: unbalanced parentheses in {text!r}")
        try:
            call = ast.parse(f"f({rest[:-1]})", mode="eval").body
            if not isinstance(call, ast.Call) or call.args or any(kw.arg is None for kw in call.keywords):
                raise SpecError(f"op {name!r}: arguments must be named, e.g. {name}(p=0.5)")
            given = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
        except SpecError:
            raise
        except (SyntaxError, ValueError) as exc:
            raise SpecError(f"op {name!r}: arguments {rest[:-1]!r} are not name=literal pairs, e.g. "
                            f"{name}(p=0.5) ({type(exc).__name__}: {exc})") from None
    op = OPS[name]
    bad = sorted(set(given) - set(op.defaults))
    if bad:
        raise SpecError(f"op {name!r} has no argument {bad[0]!r}; its arguments: {sorted(op.defaults)}")
    return name, given


def parse_ops(spec: str, defaults: RecipeDefaults) -> tuple[OpSpec, ...]:
    """A preset name or ops joined by '|'; every argument is made explicit."""
    spec = PRESETS.get(spec.strip(), spec)
    parts = [p for p in spec.split("|") if p.strip()]
    if not parts:
        raise SpecError("empty augmentation recipe")
    return tuple(parse_op(p, defaults) for p in parts)  # their order is checked by the Recipe they make

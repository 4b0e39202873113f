"""Valid ranges of the CLI's options, checked by click before any work (issue 17, items 8-9).

Every numeric option of every command takes one of these types, so a nonsense value (`--views 0`,
`--lease-timeout -1`, `--distill-weight inf`, `--seed 2**70`) is refused with click's one-line
"Invalid value for '--OPTION'" (exit 2) and `--help` shows the range. Upper bounds are generous
but finite: a value far beyond them is a typo, not a plan, and would otherwise run for ever.
Structured text options (encodings, compression, recipes, layer and head selections) are parsed by
callbacks here, with the pipeline's own parsers, so a typo is refused before a teacher is loaded.
"""
from __future__ import annotations

import math

import click

# seeds: SeedSequence takes any int >= 0, torch.manual_seed < 2**64, the store records a JSON
# integer (exact in a double below 2**53): 32 bits fits all three and every seed used so far
SEED_MAX = 2**32 - 1
BIG = 2**53  # counts of samples or bytes: JSON-exact integers


def ints(low: int, high: int) -> click.IntRange:
    return click.IntRange(low, high)


# what every --data (and --eval-data) takes: pipeline/data/patterns.py expands it
DATA_FORMS = ("a brace pattern 'd/train-{000000..000009}.tar', a glob 'd/*.tar' or "
              "'s3://bucket/train-*.tar' (its matches in sorted order), or a path or URL; repeatable, used in "
              "the order given; a pattern or glob that matches nothing is refused, naming it")

SEED = ints(0, SEED_MAX)
STEPS = ints(1, 10**9)
EPOCHS = ints(1, 10**6)
BATCH = ints(1, 2**20)
LOADER_WORKERS = ints(0, 256)  # 0: decode in this process
THREADS = ints(1, 1024)
VIEWS = ints(1, 1024)
VIEW_INDEX = ints(0, 1023)
SHARD_SIZE = ints(1, 10**8)
CLASSES = ints(2, 10**6)


class Finite(click.FloatRange):
    """A float range that also refuses nan and +-inf (FloatRange lets nan through every bound)."""

    name = "finite float"

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


def floats(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False) -> Finite:
    return Finite(low, high, min_open=low_open, max_open=high_open)


RATE = floats(0.0, 10.0, low_open=True)  # a learning rate: > 0
FRACTION = floats(0.0, 1.0, high_open=True)  # label smoothing, drop path: [0, 1)
WEIGHT = floats(0.0, 1e4)


class CompressionFactor(click.ParamType):
    """`plan --compression-factor`: none, measured, or a finite number > 0."""

    name = "none|measured|NUMBER>0"

    def convert(self, value, param, ctx):
        text = str(value).strip()
        if text in ("none", "measured"):
            return text
        try:
            number = float(text)
        except ValueError:
            self.fail(f"{value!r}: give none, measured, or a number > 0 (e.g. 2.5).", param, ctx)
        if not (math.isfinite(number) and 0 < number <= 1e6):
            self.fail(f"{value!r}: a compression factor is a finite number in (0, 1e6].", param, ctx)
        return text


class IntList(click.ParamType):
    """A comma list of integers each in `item`'s range (`repro --seeds 0,1,2`), at least one."""

    name = "INT,INT,..."

    def __init__(self, item: click.IntRange):
        self.item = item

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        parts = [p.strip() for p in str(value).split(",") if p.strip()]
        if not parts:
            self.fail(f"{value!r}: give at least one integer.", param, ctx)
        out = []
        for part in parts:
            try:
                number = int(part)
            except ValueError:
                self.fail(f"{part!r} in {value!r} is not an integer.", param, ctx)
            if not self.item.min <= number <= self.item.max:
                self.fail(f"{number} in {value!r} is not in the range {self.item.min}<=x<={self.item.max}.", param, ctx)
            out.append(number)
        return ",".join(map(str, out))


# ------------------------------------------------------------------------------ structured text options


def _spec(parse):
    """A click callback that runs `parse(value)` and turns its ValueError into click's one line."""

    def callback(ctx, param, value):
        if value is None:
            return value
        try:
            if isinstance(value, tuple):
                for v in value:
                    parse(v)
            else:
                parse(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx, param) from None
        return value

    return callback


def _encoding(text: str) -> None:
    from attncache.pipeline.encodings.spec import parse_encoding

    for part in text.split():
        parse_encoding(part)


def _compression(text: str) -> None:
    from attncache.pipeline.store.layout import parse_compression

    parse_compression(text)


def _recipe(text: str) -> None:
    from attncache.pipeline.augment.recipe import check_recipe_text

    check_recipe_text(text)


def _layers(text: str) -> None:
    from attncache.pipeline.teacher.model import check_layers_text

    check_layers_text(text)


def _heads(text: str) -> None:
    from attncache.pipeline.teacher.model import check_heads_text

    check_heads_text(text)


encoding_callback = _spec(_encoding)
compression_callback = _spec(_compression)
recipe_callback = _spec(_recipe)
layers_callback = _spec(_layers)
heads_callback = _spec(_heads)


class AmpChoice(click.Choice):
    """`--amp auto|bf16|none`, also timm's bare `--amp` flag (bf16) and a config's `amp: true|false`
    (timm's train.py YAML keys): true is bf16, false is none."""

    def __init__(self):
        super().__init__(["auto", "bf16", "none"])

    def convert(self, value, param, ctx):
        if isinstance(value, bool):
            return "bf16" if value else "none"
        return super().convert(value, param, ctx)

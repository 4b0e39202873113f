"""The default encoding's name, in a module that imports nothing: help pages and benchmark argument
parsers show it without loading torch (`spec` re-exports it beside the parser).

Chosen by students, not by KL alone (BENCHMARKS.md, "Which encoding" and the students-against-bytes
probes): the smallest encoding whose students were within seed noise of exact:fp16 on both probed
teachers (head dim 64 and 24, distilled) and with copied maps (d = 24), over 3 seeds each. It is 42.5x
smaller than exact:fp16 on a 197-token ViT-S (`plan`) and 2.04 TB for the ViT-L / ImageNet-1K plan with
4 views (lowrank:r=8:int8, the default until 2026-12-02, was 12.8x and 6.79 TB). Old stores name their
encoding in their metadata and still read.
"""
DEFAULT_ENCODING = "lowrank:r=2:int4"

# The compressor a store gets when `--compression` is not given. One for every encoding until
# 2026-12-03; now chosen per (family, row format) by `bench compression`'s rule: the largest
# `saved - cost`, and a move from zstd:3 only where it nets more than 2 points over repeated runs
# (a move re-keys that encoding's default stores). BENCHMARKS.md, "A compressor per encoding".
# - lowrank int4 rows: zstd:3:shuffle (blosc byte shuffle; the float16 scales compress better
#   shuffled): 2.2-3.7 % fewer bytes than zstd:3 at every measured rank (2, 4, 8) and scale scheme,
#   for about 1 % of the teacher's CPU time; +2.3 points mean net at r = 2 over four runs.
# - exact bf16: zstd:1 stores the same bytes (to 0.01 %) as zstd:3 for less CPU.
DEFAULT_COMPRESSION = "zstd:3"
COMPRESSION_BY_ROWS = {("lowrank", "int4"): "zstd:3:shuffle", ("exact", "bf16"): "zstd:1"}
COMPRESSION_HELP = ("the encoding's own: " + ", ".join(f"{c} for {f}:{'...:' if f == 'lowrank' else ''}{r}"
                                                      for (f, r), c in COMPRESSION_BY_ROWS.items())
                    + f", {DEFAULT_COMPRESSION} for every other")


def default_compression(family: str, rows: str) -> str:
    """The compressor of a store of this encoding family and row format when none is given."""
    return COMPRESSION_BY_ROWS.get((family, rows), DEFAULT_COMPRESSION)

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
# `saved - cost`, and a move only where it nets more than 2 points over repeated runs, for every
# encoding of that row format (a move re-keys that encoding's default stores). BENCHMARKS.md,
# "A compressor per encoding" and "Blosc blocks of 1 MB".
# - exact 16- and 32-bit float rows: zstd:1 inside blosc, byte shuffle, 1 MB blocks. With blosc's own
#   small blocks the shuffle gained nothing on fp16 Q/K; with 1 MB blocks zstd sees whole exponent
#   planes. exact:fp16: 8 % fewer bytes than zstd:3, +8.7 points net over three runs on ViT-S
#   (random init), 10 % fewer and +7.0 / +9.6 on the trained d = 64 teacher; bf16: 15 % / 20 % fewer
#   than zstd:1, +10.6 / +11.5; fp32: +8.9 / +16.2; and it encodes and decodes faster than zstd:3.
#   Low-rank float rows are not moved: +6 points on ViT-S, but none on the trained teacher at fp16.
# - low-rank int4 rows: zstd:3:shuffle (blosc's own blocks; the float16 scales compress better
#   shuffled). 1 MB or 256 KB blocks netted +2.0 to +2.5 points at r = 2-16 but -2.4 with
#   `scale=token`: not one rule for the row format, so not moved.
# - everything else (int8, fp8 rows): zstd:3; blocks netted +0.6 to +4.3 points, not at every rank.
DEFAULT_COMPRESSION = "zstd:3"
FLOAT_ROWS_COMPRESSION = "zstd:1:shuffle:block=1M"
COMPRESSION_BY_ROWS = {("lowrank", "int4"): "zstd:3:shuffle",
                       **{("exact", rows): FLOAT_ROWS_COMPRESSION for rows in ("fp16", "bf16", "fp32")}}


def _help() -> str:
    """e.g. "zstd:3:shuffle for lowrank:...:int4; zstd:1:shuffle:block=1M for exact:fp16|bf16|fp32, ..."."""
    grouped: dict[str, dict[str, list[str]]] = {}
    for (family, rows), compressor in COMPRESSION_BY_ROWS.items():
        grouped.setdefault(compressor, {}).setdefault(family, []).append(rows)
    return ("the encoding's own: "
            + "; ".join(f"{c} for " + ", ".join(f"{f}:{'...:' if f == 'lowrank' else ''}{'|'.join(rs)}" for f, rs in fams.items())
                        for c, fams in grouped.items())
            + f"; {DEFAULT_COMPRESSION} for every other")


COMPRESSION_HELP = _help()


def default_compression(family: str, rows: str) -> str:
    """The compressor of a store of this encoding family and row format when none is given."""
    return COMPRESSION_BY_ROWS.get((family, rows), DEFAULT_COMPRESSION)

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

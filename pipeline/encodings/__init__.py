"""What is stored per (sample, layer, head) and how attention comes back.

`protocol` (what every encoding offers), the families `exact` and `lowrank` (with `fit`, the low-rank
factorisation), the row codecs they store through (`rows`: float formats, `scaled`: int8 / int4 / fp8,
`codecs`: by name), `registry` (spec kind to parser), `spec` (parse a spec text), `default` (the default's
name, importing nothing), `finite` checks, `kl`.
"""

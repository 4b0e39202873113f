"""The row codecs a spec can name, in the order messages list them."""
from __future__ import annotations

from attncache.pipeline.encodings.rows import FloatRows, RowCodec
from attncache.pipeline.encodings.scaled import Fp8Rows, Int4Rows, Int8Rows

ROW_CODECS: dict[str, RowCodec] = {c.name: c for c in (FloatRows("fp32"), FloatRows("fp16"), FloatRows("bf16"),
                                                        Int8Rows(), Int4Rows(), Fp8Rows())}
QUANTS = tuple(ROW_CODECS)  # fp32 fp16 bf16 int8 int4 fp8

"""What a store is: its metadata attribute, its cache id, and the check that a resumed job is the same job."""
from __future__ import annotations

import hashlib
import json

from attncache.pipeline.data.shards import redact

META_ATTR = "attncache"


class StoreError(RuntimeError):
    """The store cannot be used as asked (mismatching metadata, missing units, bad path)."""


def cache_id(meta: dict) -> str:
    """Identity of what the cached bytes depend on: teacher weights, recipe, seed, encoding, layout, numerics."""
    keyed = {k: meta[k] for k in ("schema_version", "recipe", "seed", "layers", "heads", "encoding",
                                  "compression", "compute")}
    keyed["teacher"] = {k: meta["teacher"][k] for k in ("name", "model_args", "weights_sha256")}
    blob = json.dumps(keyed, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def require_same_job(path: str, old: dict, new: dict) -> None:
    """Resume only the same job: every field that decides the bytes must agree, and the data too."""
    fields = ("teacher", "recipe", "seed", "views", "layers", "heads", "encoding", "compression", "compute")
    diffs = [f for f in fields if old.get(f) != new.get(f)]
    if old["dataset"]["fingerprint"] != new["dataset"]["fingerprint"]:
        diffs.append("dataset")
    if diffs:
        detail = "; ".join(f"{f}: store has {_short(old.get(f))}, this run has {_short(new.get(f))}" for f in diffs)
        # a store made under an earlier default encoding is resumed by naming it: say how
        resume = (f" To resume this store, give --encoding {old['encoding']['spec']}."
                  if diffs == ["encoding"] and isinstance(old.get("encoding"), dict) and old["encoding"].get("spec")
                  else "")
        raise StoreError(f"{redact(path)} holds a different cache ({detail}).{resume} Use another --out, or delete "
                         "the store.")


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) < 160 else text[:157] + "..."

"""What a store is: its metadata attribute, its cache id, and the check that a resumed job is the same job."""
from __future__ import annotations

import hashlib
import json

from attncache.pipeline.data.shards import redact
from attncache.pipeline.encodings.spec import encoding_from_json
from attncache.pipeline.store.layout import compression_spec, parse_compression

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
        raise StoreError(f"{redact(path)} holds a different cache ({detail}).{_resume_hint(old, new, diffs)} Use "
                         "another --out, or delete the store.")


# compute settings a user gives as flags, whose defaults can move under a store: the thread count
# follows the machine's cores, the batch size a release's default
_COMPUTE_FLAGS = (("threads", "--threads"), ("batch_size", "--batch-size"))


def _recorded_spec(recorded) -> str | None:
    """The spec that makes the encoding a store's JSON records, e.g. `lowrank:r=2:int4:fit=eigh` for a
    store written before the subspace fitter (its JSON's "spec" alone would now mean that fitter)."""
    if not isinstance(recorded, dict) or not recorded.get("spec"):
        return None
    try:
        return encoding_from_json(recorded).spec
    except (ValueError, TypeError):  # a spec this version cannot parse: no hint rather than a wrong one
        return None


def _recorded_compression(recorded) -> str | None:
    """The `--compression` that makes the compression a store's JSON records (None: not one this version writes)."""
    try:
        spec = compression_spec(recorded)
        return spec if parse_compression(spec) == recorded else None
    except (KeyError, TypeError, ValueError):
        return None


def _resume_hint(old: dict, new: dict, diffs: list[str]) -> str:
    """The flags that resume the store, where only settings with a flag differ (and views, which a
    resume grows): a store made under an earlier default encoding or compressor, or at another
    machine's default thread count. No hint where the teacher, data, recipe, seed, layers, heads,
    device or torch version differ: that is another job, not a default that moved."""
    flags = []
    if "encoding" in diffs:
        spec = _recorded_spec(old.get("encoding"))
        if not spec:
            return ""
        flags.append(f"--encoding {spec}")
    if "compression" in diffs:
        spec = _recorded_compression(old.get("compression"))
        if not spec:
            return ""
        flags.append(f"--compression {spec}")  # even where the hinted --encoding defaults to it: this run
        # may have given another --compression, and the hint cannot tell (review, 2026-12-03)
    if "compute" in diffs:
        before, now = old.get("compute") or {}, new.get("compute") or {}
        if any(before.get(k) != now.get(k) for k in set(before) | set(now) if k not in dict(_COMPUTE_FLAGS)):
            return ""
        flags += [f"{flag} {before[key]}" for key, flag in _COMPUTE_FLAGS if before.get(key) != now.get(key)]
    if not flags or set(diffs) - {"encoding", "compression", "compute", "views"}:
        return ""
    grow = " (and the --views you ask for: the store grows)" if "views" in diffs else ""
    return f" To resume this store, give {' '.join(flags)}{grow}."


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) < 160 else text[:157] + "..."

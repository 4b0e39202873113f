"""The cache store's schema: versions, JSON Schemas and validation.

The store's root group carries one attribute, `attncache`, validated against `store_v{N}.json` on
every open; each unit's marker is validated against `marker_v{N}.json`. README.md in this folder is
the layout for readers in other languages.
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

import jsonschema

SCHEMA_VERSION = 2
SUPPORTED_VERSIONS = (2,)  # 1 (before 2026-12): markers did not cover metadata or input shards


class SchemaError(ValueError):
    """Store or marker metadata that this version of attncache cannot trust."""


@lru_cache(maxsize=None)
def _load(kind: str, version: int) -> dict:
    text = resources.files(__name__).joinpath(f"{kind}_v{version}.json").read_text()
    return json.loads(text)


def _check(kind: str, doc: object, where: str) -> None:
    if not isinstance(doc, dict):
        raise SchemaError(f"{where}: {kind} metadata missing or not an object")
    version = doc.get("schema_version")
    if version is None:
        raise SchemaError(f"{where}: {kind} metadata has no schema_version")
    if not isinstance(version, int) or version not in SUPPORTED_VERSIONS:
        newer = isinstance(version, int) and version > max(SUPPORTED_VERSIONS)
        older = isinstance(version, int) and version < min(SUPPORTED_VERSIONS)
        hint = (" (written by a newer attncache: upgrade)" if newer else
                " (written by an older attncache whose markers do not cover the metadata and input shards: "
                "re-run the precompute into a new --out)" if older else "")
        raise SchemaError(f"{where}: unsupported {kind} schema_version {version!r}{hint}; "
                          f"this attncache reads {list(SUPPORTED_VERSIONS)}")
    validator = jsonschema.Draft202012Validator(_load(kind, version))
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors[:10]]
        raise SchemaError(f"{where}: {kind} metadata fails schema v{version}: " + "; ".join(lines))


def validate_store_metadata(meta: object, where: str = "store") -> None:
    _check("store", meta, where)


def validate_marker(marker: object, where: str = "marker") -> None:
    _check("marker", marker, where)

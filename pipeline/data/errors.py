"""Errors of the data room and the redaction every URL goes through before it is shown.

Kept apart from the readers so that data/shards.py, data/tar.py and data/pack.py can share them
without importing each other in a cycle; pipeline.data.shards re-exports every name here."""
from __future__ import annotations

import re

_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^@\s'\"]*@")
_SECRET_QUERY = re.compile(r"(?i)(?P<name>[?&;][^=&\s'\"]*(?:sig|signature|token|secret|password|passwd|credential|"
                           r"key)[^=&\s'\"]*=)[^&\s'\"]*")


def redact(text: str, *urls: str) -> str:
    """A URL or message with object-store credentials blanked: `user:password@` in a URL and the
    values of query parameters that carry signatures, tokens, secrets or keys (presigned URLs);
    the userinfo of each of `urls` is blanked wherever it appears (a backend's error message may
    quote the path without its scheme).

    Every URL that reaches the store's metadata, a summary line, an error or a log goes through
    this, so a credential given in `--data` or `--out` is used to read and write but never shown."""
    text = str(text)
    for url in urls:
        found = re.match(r"[A-Za-z][A-Za-z0-9+.-]*://([^@\s'\"/]*)@", str(url))
        if found and found.group(1):
            text = text.replace(found.group(1), "***")
    return _SECRET_QUERY.sub(r"\g<name>***", _USERINFO.sub(r"\g<scheme>***@", text))


class BadSample(Exception):
    """One sample cannot be used; carries where and why (the message has the URL redacted)."""

    def __init__(self, url: str, key: str, reason: str):
        super().__init__(f"{redact(url)}: sample {key!r}: {reason}")
        self.url, self.key, self.reason = url, key, reason

    def __reduce__(self):  # survives pickling across loader workers and Ray
        return (BadSample, (self.url, self.key, self.reason))


class DataError(Exception):
    """A problem with the data as a whole: nothing matched, a shard that is not a tar."""

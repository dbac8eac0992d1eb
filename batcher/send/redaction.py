"""The API key kept out of everything batcher stores or shows, in every form a server echoes.

A server may send back the key it was given: as it was (in any letter case), percent-encoded
(a URL that quotes it), or in base64 (a proxy quoting ``Authorization: Basic
base64(user:key)``, a token wrapping it). A ``Redactor`` knows every such form of one key and
replaces them with ``***``: in error texts (``redact``) and in every text of a row's Outcome
before the journal sees it (``Redactor.outcome``), whichever mode built it.

Base64 of a key inside a longer encoded string depends on where the key starts within a 3-byte
group. At each of the 3 offsets, the characters made of the key's bits alone are the same
whatever surrounds the key, so those 3 "cores" (and their URL-safe spellings) find it in the
base64 of ``Bearer <key>``, ``<user>:<key>`` or any other wrapper, padded or not; what is left
of the key is at most the two characters at either end that share bits with its neighbours.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from typing import Any
from urllib.parse import quote

import orjson

from batcher.store.columns import Outcome

REDACTED = "***"
# A shorter "key" is a placeholder for a server that checks none (vLLM's "EMPTY", "dummy"):
# searched for in replies it would rewrite ordinary words of the answers, and its base64
# cores, a few characters long, would match at random.
MIN_SECRET_CHARS = 8
# Every field of an Outcome that can hold a server's text (a string, or the extra columns'
# dict): all but the row's own key.
_FIELDS = tuple(
    f.name
    for f in fields(Outcome)
    if f.name != "key" and ("str" in str(f.type) or "dict" in str(f.type))
)


@dataclass(frozen=True, slots=True)
class Redactor:
    """The forms of one key, lower-cased, and the pattern that blanks them."""

    forms: tuple[str, ...]  # longest first: a form inside a longer one is blanked with it
    pattern: re.Pattern[str] | None
    placeholder: bool  # too short to be a secret: replies are left as they are
    json_forms: tuple[bytes, ...] = ()  # the forms as JSON spells them, for ``outcome``

    def text(self, text: str) -> str:
        """``text`` with every form of the key replaced by ``***`` (``text`` itself if none).

        A substring test before any regex: this runs on every text of every reply."""
        if self.pattern is None or len(text) < len(self.forms[-1]):
            return text
        lowered = text.lower()
        for form in self.forms:
            if form in lowered:
                return self.pattern.sub(REDACTED, text)
        return text

    def value(self, value: Any) -> Any:
        """A string, or a list or dict of them (a parsed reply), redacted all through; the
        same object when nothing in it changed."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            items = [self.value(item) for item in value]
            changed = any(new is not old for new, old in zip(items, value, strict=True))
            return items if changed else value
        if isinstance(value, dict):
            pairs = {self.value(k): self.value(v) for k, v in value.items()}
            same = len(pairs) == len(value) and all(
                k in value and pairs[k] is value[k] for k in pairs
            )
            return value if same else pairs
        return value

    def outcome(self, outcome: Outcome) -> Outcome:
        """``outcome`` with the key out of its every text: the response, reasoning, tool
        calls, parsed output, response id, model, finish reason and error."""
        if self.pattern is None or self.placeholder:
            return outcome
        texts = [getattr(outcome, name) for name in _FIELDS]
        try:
            # One C-speed pass over all of them for the usual answer, none: ~6 µs a 2 KB reply
            # where a walk through each text and the extra columns' values took 14.
            blob = orjson.dumps(texts, default=str, option=orjson.OPT_NON_STR_KEYS).lower()
        except orjson.JSONEncodeError:
            blob = None  # not JSON (nothing batcher builds): each text is looked at
        if blob is not None and not any(form in blob for form in self.json_forms):
            return outcome
        changed = {}
        for name, value in zip(_FIELDS, texts, strict=True):
            if isinstance(value, str | list | dict):
                clean = self.value(value)
                if clean is not value:
                    changed[name] = clean
        return replace(outcome, **changed) if changed else outcome


@lru_cache(maxsize=8)
def redactor_for(secret: str | None) -> Redactor:
    """The Redactor of ``secret`` (None or empty: one that changes nothing)."""
    if not secret:
        return Redactor((), None, placeholder=True)
    forms = {secret, quote(secret, safe=""), quote(secret)}
    if len(secret) >= MIN_SECRET_CHARS:
        for core in base64_cores(secret.encode()):
            forms |= {core, quote(core, safe="")}
    lowered = sorted({form.lower() for form in forms}, key=lambda form: (-len(form), form))
    pattern = re.compile("|".join(re.escape(form) for form in lowered), re.IGNORECASE)
    in_json = tuple(orjson.dumps(form)[1:-1] for form in lowered)  # a '"' or '\\' escaped
    return Redactor(tuple(lowered), pattern, len(secret) < MIN_SECRET_CHARS, in_json)


def base64_cores(secret: bytes) -> set[str]:
    """The base64 characters (standard and URL-safe) that ``secret`` alone decides, at each
    of the 3 offsets it can start at within a longer encoded string."""
    cores = set()
    for offset in range(3):
        encoded = base64.b64encode(bytes(offset) + secret).decode()
        # Character i holds bits [6i, 6i + 6); the secret's bits are [8 offset, 8 (offset + n)).
        first = -(-8 * offset // 6)
        last = 8 * (offset + len(secret)) // 6
        core = encoded[first:last]
        cores |= {core, core.translate(_URL_SAFE)}
    return cores


_URL_SAFE = str.maketrans("+/", "-_")


def redact(text: str, secret: str | None) -> str:
    """``text`` with the API key, in any form a server echoes it, replaced by ``***``.

    Run it on a server's or a transport's whole text before shortening it, so a cut can never
    leave a piece of the key behind.
    """
    return redactor_for(secret).text(text)

"""Secrets out of everything written or logged: one helper for config files, MLflow params and
tags, and a sweep's state files.

    redact({"tags": {"hf_token": "hf_x", "owner": "me"}})   # {'tags': {'hf_token': '***', 'owner': 'me'}}
    redact_uri("https://me:tok@host/?token=t&x=1")           # 'https://***@host/?token=***&x=1'

A value under a secret-named key becomes '***' (`is_secret_key`); a URI anywhere in a string loses
its user:password@ part and the values of its secret-named query parameters. The config itself
keeps the real values (MLflow needs the URI to connect); only what is written is redacted.
Plain Python only (no MLflow, no Ray): the config module uses it too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

REDACTED = "***"
# a word of a key that holds a secret: hf_token, db.password, apiKey, X-Auth-Token, aws_credentials
_SECRET_WORD = re.compile(
    r"(token|secret|password|passwd|pwd|passphrase|credential|apikey|auth(?!or(?!iz)))"
)
_KEY_QUALIFIERS = frozenset({"api", "access", "private", "secret", "ssh", "signing", "encryption"})
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s\"'<>`]+")


def is_secret_key(key: object) -> bool:
    """True for a key that looks like it names a secret: hf_token, GITHUB_TOKEN, db.password,
    api_key, apiKey, client_secret, aws_credentials, X-Auth, oauth_header, ssh_key.

    The key is cut into lowercase words (at non-alphanumerics and camelCase); a word that ends in
    token, or contains secret, password, passwd, pwd, passphrase, credential, apikey or auth (not
    author) is a secret, and so is 'key' after api, access, private, secret, ssh, signing or
    encryption. So 'owner', 'author', 'tokenizer', 'max_tokens' and 'monkey' pass.
    """
    words = re.findall(r"[a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(key)).lower())
    for word in words:
        for match in _SECRET_WORD.finditer(word):
            if match.group() != "token" or word.endswith("token"):
                return True
    return any(a in _KEY_QUALIFIERS and b == "key" for a, b in zip(words, words[1:], strict=False))


def redact_uri(uri: str) -> str:
    """The URI with user:password@ (or a lone user@, often a token) as ***@ and the values of its
    secret-named query parameters as ***; anything else is left as written."""
    try:
        parts = urlsplit(uri)
    except ValueError:  # e.g. an invalid IPv6 host: say nothing of it
        return REDACTED
    netloc, query = parts.netloc, parts.query
    if "@" in netloc:
        netloc = REDACTED + "@" + netloc.rpartition("@")[2]
    if query:
        query = "&".join(_redact_param(p) for p in query.split("&"))
    if (netloc, query) == (parts.netloc, parts.query):
        return uri
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def redact_text(text: str) -> str:
    """`text` with every URI in it redacted (`redact_uri`)."""
    if "://" not in text:
        return text
    return _URI.sub(lambda m: redact_uri(m.group()), text)


def redact(data: Any) -> Any:
    """A copy of plain data (mappings, lists, scalars) with the values of secret-named keys as
    '***' and the URIs in its strings redacted."""
    if isinstance(data, Mapping):
        return {k: REDACTED if is_secret_key(k) else redact(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(redact(v) for v in data)
    if isinstance(data, str):
        return redact_text(data)
    return data


def _redact_param(param: str) -> str:
    name, sep, _ = param.partition("=")
    return f"{name}={REDACTED}" if sep and is_secret_key(unquote(name)) else param

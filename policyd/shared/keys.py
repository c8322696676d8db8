"""API key format, Argon2id hashing and the keyed digest used on the hot path.

A key is `nz_<prefix>_<secret>`: the prefix (8 lowercase base32 characters) is a public
lookup id, the secret 43 base62 characters (~256 bits). Postgres stores only an Argon2id
hash of the whole key. Argon2id is deliberately slow, so after one successful check the
caches keep an HMAC-SHA256 of the key under a server secret: equal digests prove the same
key, and the digest is useless to anyone without the server secret.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from typing import Final

import attrs
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from policyd.shared.contract import KEY_PREFIX_LEN, KEY_SCHEME

__all__ = [
    "GeneratedKey",
    "ParsedKey",
    "generate_key",
    "hash_key",
    "is_prefix",
    "keyed_digest",
    "parse_key",
    "verify_key_hash",
]

_PREFIX_ALPHABET: Final = "abcdefghijklmnopqrstuvwxyz234567"
_SECRET_ALPHABET: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # noqa: S105
_SECRET_LEN: Final = 43
_KEY_RE: Final = re.compile(
    rf"^{KEY_SCHEME}([a-z2-7]{{{KEY_PREFIX_LEN}}})_([0-9A-Za-z]{{{_SECRET_LEN}}})$"
)
_PREFIX_RE: Final = re.compile(rf"^{KEY_SCHEME}[a-z2-7]{{{KEY_PREFIX_LEN}}}$")

# OWASP's Argon2id baseline (19 MiB, 2 passes, 1 lane). The key's secret has ~256 bits
# of entropy, so the hash guards against a stolen table, not weak secrets; a miss costs
# tens of milliseconds, and misses are rare because of the digest caches.
_HASHER: Final = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)


@attrs.frozen
class ParsedKey:
    """A syntactically valid key: its public prefix (`nz_xxxxxxxx`) and the full text."""

    prefix: str
    full: str = attrs.field(repr=False)


@attrs.frozen
class GeneratedKey:
    """A new key and the hash to store; `full` is shown to the operator exactly once."""

    prefix: str
    full: str = attrs.field(repr=False)
    secret_hash: str = attrs.field(repr=False)


def parse_key(value: str) -> ParsedKey | None:
    """Return the key's parts if `value` has the key format, else None (no secret work)."""
    match = _KEY_RE.fullmatch(value)
    if match is None:
        return None
    return ParsedKey(prefix=KEY_SCHEME + match.group(1), full=value)


def is_prefix(value: str) -> bool:
    """True if `value` looks like a key prefix such as `nz_ab12cd34`."""
    return _PREFIX_RE.fullmatch(value) is not None


def generate_key() -> GeneratedKey:
    """Draw a fresh prefix and secret from the OS CSPRNG and hash the result."""
    prefix = KEY_SCHEME + "".join(secrets.choice(_PREFIX_ALPHABET) for _ in range(KEY_PREFIX_LEN))
    secret = "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(_SECRET_LEN))
    full = f"{prefix}_{secret}"
    return GeneratedKey(prefix=prefix, full=full, secret_hash=hash_key(full))


def hash_key(full: str) -> str:
    """Argon2id PHC string for a whole key."""
    return _HASHER.hash(full)


def verify_key_hash(stored_hash: str, full: str) -> bool:
    """Argon2id check (constant time inside argon2); False on mismatch or a corrupt hash."""
    try:
        return _HASHER.verify(stored_hash, full)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def keyed_digest(secret: bytes, full: str) -> str:
    """HMAC-SHA256 of the key under the server secret, hex; compare with hmac.compare_digest."""
    return hmac.new(secret, full.encode(), hashlib.sha256).hexdigest()

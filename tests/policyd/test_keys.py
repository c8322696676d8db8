"""Key format, Argon2id hashing and the keyed digest."""

from __future__ import annotations

import pytest

from policyd.shared.keys import (
    generate_key,
    is_prefix,
    keyed_digest,
    parse_key,
    verify_key_hash,
)


def test_generated_key_parses_back_to_its_prefix() -> None:
    """A new key has the `nz_<prefix>_<secret>` form and its own prefix."""
    key = generate_key()
    parsed = parse_key(key.full)
    assert parsed is not None
    assert parsed.prefix == key.prefix
    assert is_prefix(key.prefix)
    assert key.full.startswith(key.prefix + "_")


def test_only_the_hash_verifies_the_key() -> None:
    """The stored Argon2id hash accepts the key and nothing else."""
    key = generate_key()
    assert key.secret_hash.startswith("$argon2id$")
    assert key.full not in key.secret_hash
    assert verify_key_hash(key.secret_hash, key.full)
    other = "y" if key.full.endswith("x") else "x"
    assert not verify_key_hash(key.secret_hash, key.full[:-1] + other)
    assert not verify_key_hash("not-a-hash", key.full)


def test_keys_and_prefixes_do_not_repeat() -> None:
    """Secrets come from a CSPRNG: no two keys share a secret."""
    keys = {generate_key().full for _ in range(5)}
    assert len(keys) == 5


@pytest.mark.parametrize(
    "value",
    [
        "",
        "nz_",
        "sk-abc",
        "nz_ABCDEFGH_" + "a" * 43,
        "nz_abcdefgh_" + "a" * 42,
        "nz_abcdefgh_" + "a" * 44,
        "nz_abcdefgh-" + "a" * 43,
        "nz_abcdefg1_" + "a" * 43,
        " nz_abcdefgh_" + "a" * 43,
        "nz_abcdefgh_" + "a" * 42 + "\n",
    ],
)
def test_malformed_keys_are_rejected_without_secret_work(value: str) -> None:
    """Anything not in the key format is refused by shape alone."""
    assert parse_key(value) is None


def test_keyed_digest_depends_on_the_server_secret() -> None:
    """The digest cannot be recomputed without the server secret."""
    key = generate_key().full
    assert keyed_digest(b"a" * 32, key) == keyed_digest(b"a" * 32, key)
    assert keyed_digest(b"a" * 32, key) != keyed_digest(b"b" * 32, key)


def test_key_repr_never_shows_the_secret() -> None:
    """Debug output of key values leaves the secret out."""
    key = generate_key()
    assert key.full not in repr(key)
    assert key.secret_hash not in repr(key)

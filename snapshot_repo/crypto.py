"""Crypto-shredding (opt-in): each user's payloads encrypted under that user's own key.

Envelope encryption with AES-256-GCM (`cryptography`, the `snapshot_repo[crypto]`
extra):

- Every (tenant, namespace, user) gets a random 256-bit data key, stored only
  wrapped (encrypted) by a key-encryption key from a `KeyProvider`, in
  `snapshot_data_keys`.
- Payloads are sealed with the data key; the user's scope and id are the
  associated data, so a ciphertext moved to another user does not open.
- Erasing the user deletes its data key in the same transaction. Copies of
  the payloads elsewhere (replicas, WAL archives, dumps, backups) then hold
  ciphertext whose key no longer exists in the live database.
- Backups also hold the wrapped data keys. `rotate_wrapping_key` re-wraps
  every live data key under the provider's active key without touching
  payloads; once the old key-encryption key is destroyed, no backup taken
  before the rotation can unwrap any data key, so erased users' copies are
  unreadable for good (and so is every other copy in those old backups:
  keep the old key as long as you must be able to restore them).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from .errors import ConfigurationError, DecryptionError

__all__ = [
    "SEALED_PREFIX",
    "KeyProvider",
    "LocalKeyProvider",
    "new_data_key",
    "open_payload",
    "seal_payload",
]

SEALED_PREFIX = b"SRE1"
"""Marks a sealed payload (format 1: prefix, 12-byte nonce, AES-GCM ciphertext and tag)."""

_NONCE = 12
_KEY_BYTES = 32


def _aesgcm(key: bytes) -> Any:
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError:  # pragma: no cover - depends on the installed extras
        raise ConfigurationError(
            "encryption needs the 'cryptography' package: pip install 'snapshot-repo[crypto]'"
        ) from None
    return AESGCM(key)


@runtime_checkable
class KeyProvider(Protocol):
    """Wraps and unwraps data keys with key-encryption keys the application controls.

    Implement it over a KMS or HSM to keep key-encryption keys out of the
    process; `LocalKeyProvider` keeps them in memory.
    """

    @property
    def active_key_id(self) -> str:
        """The key new data keys are wrapped with (and rotation re-wraps to)."""
        ...

    def wrap(self, data_key: bytes) -> tuple[str, bytes]:
        """Encrypt `data_key` under the active key; return (key id, wrapped key)."""
        ...

    def unwrap(self, key_id: str, wrapped: bytes) -> bytes:
        """The data key, or `DecryptionError` if `key_id` is unknown or the key does not fit."""
        ...


class LocalKeyProvider:
    """Key-encryption keys held in memory (e.g. loaded from a secret store at start-up).

    Args:
        keys: key id to 32-byte key. Keep retired keys here until every data
            key was re-wrapped (`rotate_wrapping_key`) and old backups expired.
        active: the id of the key new data keys are wrapped with.

    Raises:
        ConfigurationError: no keys, a key that is not 32 bytes, or an unknown
            active id.
    """

    def __init__(self, keys: Mapping[str, bytes], active: str) -> None:
        if not keys or active not in keys:
            raise ConfigurationError("LocalKeyProvider needs keys and an active key id among them")
        for key_id, key in keys.items():
            if not isinstance(key, bytes) or len(key) != _KEY_BYTES:
                raise ConfigurationError(f"key {key_id!r} must be {_KEY_BYTES} bytes")
        self._keys = dict(keys)
        self._active = active

    @property
    def active_key_id(self) -> str:
        return self._active

    def wrap(self, data_key: bytes) -> tuple[str, bytes]:
        nonce = os.urandom(_NONCE)
        sealed: bytes = _aesgcm(self._keys[self._active]).encrypt(
            nonce, data_key, self._active.encode()
        )
        return self._active, nonce + sealed

    def unwrap(self, key_id: str, wrapped: bytes) -> bytes:
        key = self._keys.get(key_id)
        if key is None:
            raise DecryptionError(f"the key-encryption key {key_id!r} is not available")
        try:
            data_key: bytes = _aesgcm(key).decrypt(
                wrapped[:_NONCE], wrapped[_NONCE:], key_id.encode()
            )
        except Exception as exc:  # cryptography's InvalidTag, or a truncated value
            raise DecryptionError(
                f"a data key wrapped under {key_id!r} does not open with that key"
            ) from exc
        return data_key


def new_data_key() -> bytes:
    """A fresh random 256-bit data key."""
    return os.urandom(_KEY_BYTES)


def seal_payload(data_key: bytes, payload: bytes, associated: bytes) -> bytes:
    """Encrypt `payload`; `associated` (the user's scope and id) is authenticated, not stored."""
    nonce = os.urandom(_NONCE)
    sealed: bytes = _aesgcm(data_key).encrypt(nonce, payload, associated)
    return SEALED_PREFIX + nonce + sealed


def open_payload(data_key: bytes | None, sealed: bytes, associated: bytes, where: str) -> bytes:
    """Decrypt a payload sealed by `seal_payload`; plain payloads pass through.

    Raises:
        DecryptionError: the payload is sealed and the key is missing (the user
            was crypto-shredded) or wrong.
    """
    if not sealed.startswith(SEALED_PREFIX):
        return sealed
    if data_key is None:
        raise DecryptionError(f"{where} is encrypted and its data key no longer exists")
    body = sealed[len(SEALED_PREFIX) :]
    try:
        plain: bytes = _aesgcm(data_key).decrypt(body[:_NONCE], body[_NONCE:], associated)
    except Exception as exc:
        raise DecryptionError(f"{where} does not open with its data key") from exc
    return plain

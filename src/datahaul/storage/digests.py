"""A whole file's digests, and how an assembled file is checked against the
ones its sender named."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import xxhash


@dataclass(frozen=True)
class Digests:
    """The SHA-256 a file is recorded under, and the XXH128 that `datahaul
    send` names for the check (a fourteenth of SHA-256's CPU)."""

    sha256: str
    xxh128: str

    @classmethod
    def of(cls, content: bytes) -> Digests:
        return cls(
            hashlib.sha256(content).hexdigest(), xxhash.xxh3_128_hexdigest(content)
        )


class FileHasher:
    """Both digests of a file whose bytes are fed in order."""

    def __init__(self) -> None:
        self._sha256 = hashlib.sha256()
        self._xxh128 = xxhash.xxh3_128()

    def update(self, data: bytes) -> None:
        self._sha256.update(data)
        self._xxh128.update(data)

    def digests(self) -> Digests:
        return Digests(self._sha256.hexdigest(), self._xxh128.hexdigest())


def integrity_error(
    actual: Digests, expected_sha256: str | None, expected_xxh128: str | None
) -> str | None:
    """Why an assembled file is not what its sender named, if it is not."""
    if expected_sha256 is not None and expected_sha256 != actual.sha256:
        return (
            f"assembled SHA-256 {actual.sha256} differs from the sender's "
            f"{expected_sha256}"
        )
    if expected_xxh128 is not None and expected_xxh128 != actual.xxh128:
        return (
            f"assembled XXH128 {actual.xxh128} differs from the sender's "
            f"{expected_xxh128}"
        )
    return None

"""Sizes as people write them (256K, 1M, 1GiB) and figures as people read them."""

from __future__ import annotations

import re

from datahaul.errors import ConfigError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
MB = 1_000_000

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_POWERS = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB}


def parse_size(text: str) -> int:
    """Bytes from '1024', '256K', '1M', '64MiB' or '1G' (powers of 1024)."""
    match = _SIZE.match(text)
    if match is None:
        raise ConfigError(
            f"size {text!r} is not understood; write a number of bytes or one "
            "with a K, M or G suffix, such as 256K or 1G"
        )
    number, suffix = match.groups()
    size = int(float(number) * _POWERS[suffix.lower()])
    if size <= 0:
        raise ConfigError(f"size {text!r} must be more than zero bytes, e.g. 256K")
    return size


def parse_sizes(text: str) -> list[int]:
    """A comma-separated list of sizes, such as '256K,1M'."""
    sizes = [parse_size(part) for part in text.split(",") if part.strip()]
    if not sizes:
        raise ConfigError(f"no size given in {text!r}; write e.g. 256K,1M")
    return sizes


def size_name(size: int) -> str:
    """The shortest exact name of a size: 1 KiB, 256 KiB, 1 MiB, 1.5 GiB."""
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if size >= unit:
            value = size / unit
            text = f"{value:.0f}" if value == int(value) else f"{value:.2f}"
            return f"{text} {name}"
    return f"{size} B"


def flag_name(size: int) -> str:
    """The size in the form the sender's --chunk-size takes: 256K, 1M, 1000."""
    for unit, suffix in ((GiB, "G"), (MiB, "M"), (KiB, "K")):
        if size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


def mb_per_s(size: int, seconds: float) -> float:
    """Throughput in MB/s (10^6 bytes), the unit every table here uses."""
    return size / MB / seconds

"""keep_large_buffers: freed message buffers are reused, not faulted in again."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="tunes glibc's allocator only"
)

# Rounds of a dozen 1 MiB buffers, held together and freed together, as a
# worker's batch of bundles is; the second half's page faults are printed.
PROBE = """
import resource, sys
from datahaul.cli import common
if sys.argv[1] == "keep":
    common.keep_large_buffers()

def rounds():
    for _ in range(20):
        held = [bytearray(1024 * 1024) for _ in range(12)]
        for block in held:
            block[::4096] = b"x" * len(block[::4096])
        del held

rounds()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    probe = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return int(probe.stdout)


def test_freed_buffers_are_reused_without_page_faults() -> None:
    """By default glibc gives such buffers back and faults them in again;
    told to keep them, the process reuses them."""
    plain, kept = _faults("plain"), _faults("keep")

    assert plain > 500, "glibc no longer returns these buffers; is the call needed?"
    assert kept * 10 < plain

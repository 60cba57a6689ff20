"""Tests of the allocator settings that training processes apply to themselves."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from trainables import allocator

# Allocates, writes and frees a 100 MiB buffer five times and prints the minor page faults
# of each round. Blocks that size are above glibc's largest default mmap threshold, so by
# default every round maps fresh pages.
FAULT_COUNTER = """
import json, resource, sys
import numpy as np
from trainables.allocator import keep_freed_memory

applied = keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = np.ones(100 * 2**20, dtype=np.uint8)
    del buffer
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""

# With transparent huge pages the kernel can map 2 MiB per fault, so a fresh buffer takes at
# least 50 faults.
MIN_FAULTS_PER_FRESH_BUFFER = 100 * 2**20 // 2**21


def count_faults(mode: str) -> dict:
    output = subprocess.run(
        [sys.executable, "-c", FAULT_COUNTER, mode], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(output)


def glibc_linux() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not glibc_linux(), reason="the settings apply only to glibc's malloc")
def test_freed_memory_reused_without_page_faults():
    default = count_faults("default")
    kept_memory = count_faults("keep")

    assert kept_memory["applied"] is True
    # The first round maps the buffer's pages either way.
    assert min(default["faults"][1:]) >= MIN_FAULTS_PER_FRESH_BUFFER
    assert max(kept_memory["faults"][1:]) < MIN_FAULTS_PER_FRESH_BUFFER // 10


def test_keep_freed_memory_without_glibc(monkeypatch):
    # This machine runs glibc, so a different C library is simulated.
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    allocator.keep_freed_memory.cache_clear()
    try:
        assert allocator.keep_freed_memory() is False
    finally:
        allocator.keep_freed_memory.cache_clear()

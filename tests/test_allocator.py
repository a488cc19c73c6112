"""umamba.allocator: freed tensors stay with the process (checked on resident memory)."""

import platform
import subprocess
import sys

import pytest

# Allocates a 256 MiB tensor, touches it, frees it, and prints how much resident memory the
# free gave back to the system (MiB).
PROBE = """
import sys, torch
from umamba.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
x = torch.ones(64 * 2**20)  # 256 MiB, every page touched
before = rss_mib()
del x
print(before - rss_mib())
"""


def given_back_mib(mode):
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting exists in glibc only")
def test_freed_tensor_memory_is_kept_only_when_asked():
    assert given_back_mib("default") > 200  # glibc's default: a block this large is unmapped when freed
    assert given_back_mib("keep") < 10  # kept for the next tensor

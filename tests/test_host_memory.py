"""keep_freed_memory: a large block freed and allocated again (as XLA does on every call) faults no pages."""
import json
import subprocess
import sys

import pytest

from sdjax import host_memory

# A worker thread mallocs, touches and frees 64 MiB five times (XLA's runtime threads do this per call);
# prints the minor page faults of the last four rounds.
_CHILD = """
import ctypes, json, resource, sys, threading
from sdjax import host_memory
kept = sys.argv[1] == "1" and host_memory.keep_freed_memory()
libc = host_memory._glibc()
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
faults = []
def work():
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(2 ** 26)
        ctypes.memset(block, 1, 2 ** 26)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
t = threading.Thread(target=work)
t.start(); t.join()
print(json.dumps(dict(kept=kept, faults=faults[1:])))
"""


def _faults(keep):
    out = subprocess.run([sys.executable, "-c", _CHILD, "1" if keep else "0"], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.skipif(host_memory._glibc() is None, reason="glibc only")
def test_freed_memory_is_reused_without_page_faults():
    pages = 64 * 2 ** 20 // 4096
    plain, kept = _faults(False), _faults(True)
    assert kept["kept"]
    assert min(plain["faults"]) > pages // 2  # glibc maps the block afresh each time: every page faults again
    assert max(kept["faults"]) < pages // 20  # reused: the pages are already there


def test_only_on_cpu(monkeypatch):
    """On GPU/TPU the buffers live on the device: malloc is left as it is."""
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert not host_memory.runs_on_cpu() and not host_memory.keep_freed_memory()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_memory.runs_on_cpu()


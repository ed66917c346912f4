"""Zero copy, flat memory over many calls, and concurrent Python threads."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import psutil
import torch

from peft_loraone.engine import lora_one

PEAK_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from peft_loraone.engine import lora_one

    def hwm():  # peak resident memory (VmHWM) in bytes
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

    m, n = 4096, 4096
    g = torch.randn(m, n)             # 64 MiB of float32, touched
    lora_one(torch.randn(m, n), 8, power_iters=1, tol=0.0)  # warm up the engine and its BLAS buffers
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                  # reset the peak to the current RSS
    before = rss()
    if sys.argv[1] == "engine":
        f = lora_one(g, 8, power_iters=1, tol=0.0)
    else:
        c = g.clone()                 # what a copy of the input would cost
    print(hwm() - before, g.numel() * g.element_size())
    """
)


def _peak_growth(mode: str) -> tuple[int, int]:
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, mode], check=True, capture_output=True, text=True, timeout=300
    ).stdout.split()
    return int(out[0]), int(out[1])


def test_float32_input_is_read_without_a_copy():
    """Peak RSS grows by far less than the input's size (a copy would add all of it)."""
    growth, nbytes = _peak_growth("engine")
    copy_growth, _ = _peak_growth("copy")
    assert copy_growth >= 0.9 * nbytes  # the probe can see a copy
    # Workspace: a few panels of (m + n) x k float64 values, well under 10% of G here.
    assert growth < 0.1 * nbytes, (growth, nbytes)


def test_ten_thousand_calls_keep_memory_flat():
    proc = psutil.Process()
    g = torch.randn(16, 12)
    out_b, out_a = torch.empty(16, 3), torch.empty(3, 12)
    for _ in range(500):  # warm-up: allocator pools, Go heap
        lora_one(g, 3, out_b=out_b, out_a=out_a)
    start = proc.memory_info().rss
    for _ in range(10_000):
        lora_one(g, 3, out_b=out_b, out_a=out_a)
    growth = proc.memory_info().rss - start
    # Bound: 8 MiB for 10,000 calls, i.e. < 840 bytes a call; a leaked capsule, view
    # or C string per call would exceed it.
    assert growth < 8 * 2**20, growth


def test_two_threads_at_once_get_correct_results():
    gs = [torch.randn(200, 150, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    want = [lora_one(g, 4, seed=3) for g in gs]
    results: dict[int, list] = {0: [], 1: []}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(20):
                results[i].append(lora_one(gs[i], 4, seed=3))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(2):
        assert len(results[i]) == 20
        for f in results[i]:
            assert torch.equal(f.B, want[i].B) and torch.equal(f.A, want[i].A)


def test_release_memory_drops_the_kept_workspaces():
    """A call leaves its scratch memory (workspace) for the next call; release_memory() drops it, and
    initialize() does so when it is done."""
    from peft_loraone.engine import release_memory

    release_memory()
    g = torch.randn(300, 200)
    first = lora_one(g, 4)
    assert release_memory() >= 1
    assert release_memory() == 0
    lora_one(g, 4)
    second = lora_one(g, 4)  # through the workspace the call before left
    torch.testing.assert_close(second.B, first.B, rtol=0, atol=0)
    torch.testing.assert_close(second.A, first.A, rtol=0, atol=0)
    release_memory()

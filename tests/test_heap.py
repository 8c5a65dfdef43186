"""The C heap keeps what a decode step frees: the next step's blocks are not faulted in anew."""

import json
import subprocess
import sys

STEPS = """
import json, resource, threading, torch
from rugpt_ray.heap import keep_freed_memory

def faults_per_step(steps=20):
    # a sampling step's pattern, on a worker thread (the engine's): fresh logits, their softmax, freed
    def run():
        for _ in range(steps):
            torch.empty(16, 50264).fill_(1.0).softmax(-1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps

torch.set_num_threads(1)
faults_per_step()  # the thread's heap is made once either way
default = faults_per_step()
kept = keep_freed_memory()
print(json.dumps({"default": default, "kept": kept, "after": faults_per_step()}))
"""


def test_freed_blocks_are_reused_without_page_faults():
    """Each 3.2 MB block of a step is 785 pages: with glibc's defaults a step faults hundreds of them in (270 here),
    after `keep_freed_memory` almost none."""
    out = json.loads(subprocess.run([sys.executable, "-c", STEPS], capture_output=True, text=True, check=True,
                                    timeout=120).stdout)
    assert out["kept"] is True
    assert out["default"] > 100 and out["after"] < out["default"] / 20, out

"""Why mtl.io reads safetensors with preadv instead of a memory map: peak RSS of reading a file tensor by tensor.

    python experiments/bench/safetensors_rss.py [--gb 0.5] [--tensor-mb 16] [--dir /tmp/mtl_bench_st]

Writes one file of ``--gb`` (f32 tensors of ``--tensor-mb``), then, each in a
fresh subprocess, reads every tensor once, dropping it before the next, with
(a) ``safetensors.safe_open(..., framework="numpy")`` held open, as a lazy
loader does, and (b) :class:`mtl.io.SafetensorsSource`; prints the peak RSS
(``VmHWM``) above the RSS after the imports.  The pages a memory map touched
stay resident (and counted) until the file is closed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

CHILD = r'''
import sys
sys.path.insert(0, {root!r})
import numpy as np
from safetensors import safe_open
from mtl.io import SafetensorsSource
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
start = hwm()
if {which!r} == "safe_open":
    with safe_open({path!r}, framework="numpy") as f:
        for n in f.keys():
            x = f.get_tensor(n); float(x.reshape(-1)[0]); del x
        print(hwm() - start)
else:
    src = SafetensorsSource({path!r})
    for n in src.paths():
        x = src.load(n); float(x.reshape(-1)[0]); del x
    print(hwm() - start)
'''


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=0.5)
    ap.add_argument("--tensor-mb", type=float, default=16)
    ap.add_argument("--dir", default="/tmp/mtl_bench_st")
    args = ap.parse_args()
    from mtl.io import SafetensorsWriter, TensorSpec

    cols = int(args.tensor_mb * 2**20 / 4 / 1024)
    n = max(1, round(args.gb * 1e9 / (1024 * cols * 4)))
    os.makedirs(args.dir, exist_ok=True)
    path = os.path.join(args.dir, "model.safetensors")
    rng = np.random.default_rng(0)
    with SafetensorsWriter(path, {f"t{i}": TensorSpec((1024, cols), np.dtype(np.float32)) for i in range(n)},
                           overwrite=True) as w:
        for i in range(n):
            w(f"t{i}", rng.standard_normal((1024, cols), dtype=np.float32))
    size = os.path.getsize(path) / 2**20
    print(f"file: {size:.0f} MB, {n} tensors of {args.tensor_mb:.0f} MB")
    for which in ("safe_open", "mtl"):
        out = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT, which=which, path=path)],
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        name = "safetensors.safe_open (mmap)" if which == "safe_open" else "mtl.io.SafetensorsSource (preadv)"
        print(f"  {name:36s} peak RSS above imports: {float(out):6.0f} MB = {float(out) / size:.2f} x the file")
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Seconds per training step of the default backbone, by precision and thread count.

One step is what ``cellplug train`` does per batch: forward under autocast (or not), the
decoder's loss, backward, AdamW update; batch 8 of 2 x 128 x 128 patches (the generalist's
recipe), channels-last, random inputs (the cost does not depend on the values). Each
configuration runs in its own process (torch fixes its thread pool once), two warm-up
steps, then the best of ``--steps`` timed steps. bfloat16 is timed where the CPU has it natively
and, with ``--bf16-anyway``, where it does not (there it is emulated and many times slower).
No Cellpose: it has no training path to compare on a CPU; this is for choosing settings.

    python benchmarks/train_step.py [--patch 128] [--steps 3] [--bf16-anyway]

Writes ``benchmarks/results/train_step.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, versions, write_json  # noqa: E402


def one(threads: int, bf16: bool, patch: int, steps: int) -> float:
    import torch

    from cellplug.plugins import get_registry

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    reg = get_registry()
    decoder = reg.get("decoder", "cellpose-flows")
    net = reg.get("backbone", "cellpose-unet")(n_channels=2, n_outputs=decoder.n_outputs)
    net = net.to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x = torch.randn(8, 2, patch, patch).to(memory_format=torch.channels_last)
    t = torch.rand(8, 3, patch, patch)
    best = float("inf")
    for i in range(steps + 2):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            raw, _ = net(x)
        loss = decoder.loss(raw.float(), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 2:  # the first steps warm up (allocator, oneDNN primitives)
            best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--bf16-anyway", action="store_true")
    ap.add_argument("--one", nargs=2, metavar=("THREADS", "PRECISION"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        threads, precision = int(args.one[0]), args.one[1]
        print(one(threads, precision == "bf16", args.patch, args.steps))
        return 0

    from cellplug.inference import bf16_supported

    native = bf16_supported()
    configs = [(2, "fp32"), (1, "fp32")]
    if native:
        configs += [(2, "bf16"), (1, "bf16")]
    elif args.bf16_anyway:
        configs += [(2, "bf16")]  # emulated: one configuration shows it
    rows = []
    for threads, precision in configs:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                str(threads),
                precision,
                "--patch",
                str(args.patch),
                "--steps",
                str(args.steps),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()[-1]
        rows.append({"threads": threads, "precision": precision, "seconds": round(float(out), 3)})
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "machine": machine(),
        "versions": versions("torch", "numpy"),
        "native_bf16": native,
        "batch": 8,
        "patch": args.patch,
        "rows": rows,
    }
    write_json(RESULTS / "train_step.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

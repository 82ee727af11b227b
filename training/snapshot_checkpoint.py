"""Copy a training checkpoint into the repository in half precision (for resuming elsewhere).

    python training/snapshot_checkpoint.py runs/generalist/ckpt training/generalist/checkpoint \
        [--with-optimizer]

Writes ``checkpoint.pt`` and ``checkpoint.json`` (epoch and history). The weights are stored
as float16 (13 MB). Without ``--with-optimizer`` the optimiser state is left out, so AdamW
restarts its moment estimates on resume; with it, AdamW's moments are kept as bfloat16
(+26 MB; bfloat16 rather than float16 because the second moments, ~1e-10 and smaller,
underflow float16), and torch casts them back to float32 when the run resumes, so a run
split across machines keeps its optimiser trajectory up to that rounding. To resume, copy
both files into a run's checkpoint folder and pass ``--resume``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch


def cast(obj, dtype: torch.dtype):
    """Floating tensors (other than scalars such as diam_mean or a step count) to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.numel() > 1 else obj
    if isinstance(obj, dict):
        return {k: cast(v, dtype) for k, v in obj.items()}
    if isinstance(obj, list):
        return [cast(v, dtype) for v in obj]
    return obj


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src", type=Path, help="a run's checkpoint folder")
    ap.add_argument("dst", type=Path, help="where to write the half-precision copy")
    ap.add_argument("--with-optimizer", action="store_true", help="keep AdamW's moments")
    args = ap.parse_args()
    ckpt = torch.load(args.src / "checkpoint.pt", map_location="cpu", weights_only=True)
    out = {"model": cast(ckpt["model"], torch.float16), "epoch": ckpt["epoch"]}
    if args.with_optimizer and "optimizer" in ckpt:
        out["optimizer"] = cast(ckpt["optimizer"], torch.bfloat16)
    args.dst.mkdir(parents=True, exist_ok=True)
    tmp = args.dst / "checkpoint.pt.tmp"
    torch.save(out, tmp)
    tmp.replace(args.dst / "checkpoint.pt")
    shutil.copy(args.src / "checkpoint.json", args.dst / "checkpoint.json")
    size = (args.dst / "checkpoint.pt").stat().st_size / 2**20
    print(f"epoch {out['epoch']}: {args.dst / 'checkpoint.pt'} ({size:.1f} MiB)")


if __name__ == "__main__":
    main()

"""Copy a training checkpoint into the repository in half precision (for resuming elsewhere).

    python training/snapshot_checkpoint.py runs/generalist/ckpt training/generalist/checkpoint

Writes ``checkpoint.pt`` (the weights as float16, 13 MB; the optimiser state is left out to
keep the repository small, so AdamW restarts its moment estimates on resume) and
``checkpoint.json`` (epoch and history). To resume from it, copy both into a run's checkpoint
folder and pass ``--resume``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch


def half(obj):
    if isinstance(obj, torch.Tensor):
        return obj.half() if obj.is_floating_point() and obj.numel() > 1 else obj
    if isinstance(obj, dict):
        return {k: half(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [half(v) for v in obj]
    return obj


def main(src: str, dst: str) -> None:
    src_dir, dst_dir = Path(src), Path(dst)
    ckpt = torch.load(src_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    ckpt = {"model": half(ckpt["model"]), "epoch": ckpt["epoch"]}
    dst_dir.mkdir(parents=True, exist_ok=True)
    tmp = dst_dir / "checkpoint.pt.tmp"
    torch.save(ckpt, tmp)
    tmp.replace(dst_dir / "checkpoint.pt")
    shutil.copy(src_dir / "checkpoint.json", dst_dir / "checkpoint.json")
    size = (dst_dir / "checkpoint.pt").stat().st_size / 2**20
    print(f"epoch {ckpt['epoch']}: {dst_dir / 'checkpoint.pt'} ({size:.1f} MiB)")


if __name__ == "__main__":
    main(*sys.argv[1:3])

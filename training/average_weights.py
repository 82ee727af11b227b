"""Average the weights of several checkpoints or models of one architecture (weight averaging).

Usage:
    python training/average_weights.py [--meta MODEL.json] OUT.pth IN1 IN2 [IN3 ...]

Each input is a training checkpoint (``checkpoint.pt``, with a ``model`` state dict) or a
saved model ``.pth``; all must share keys and shapes. Floating-point tensors (weights and
BatchNorm running statistics) are averaged in float32; integer buffers come from the last
input. The metadata ``.json`` (``--meta``, else that of the last ``.pth`` input) is copied
beside ``OUT.pth`` with its size model kept as is, so refit it afterwards on the training
data:

    cellplug train SOURCES... --base OUT.pth --epochs 0 --out FINAL.pth ...

(zero epochs: no training, only the size model and style centroid are fitted and saved).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from cellplug.io import file_sha256
from cellplug.models import load_state_dict


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """A model ``.pth`` (checked by cellplug's safe loader) or a training checkpoint's weights."""
    if path.suffix == ".pth":
        return load_state_dict(path)
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    keys = states[0].keys()
    for s in states[1:]:
        if s.keys() != keys:
            raise SystemExit("inputs have different parameter names")
    out = {}
    for k in keys:
        ts = [s[k] for s in states]
        if any(t.shape != ts[0].shape for t in ts):
            raise SystemExit(f"{k}: shapes differ")
        if ts[0].is_floating_point():
            out[k] = torch.stack([t.float() for t in ts]).mean(0)
        else:
            out[k] = ts[-1].clone()
    return out


def main(argv: list[str]) -> None:
    metas = []
    if argv[:1] == ["--meta"]:
        metas, argv = [Path(argv[1])], argv[2:]
    if len(argv) < 3:
        raise SystemExit(__doc__)
    out = Path(argv[0])
    inputs = [Path(a) for a in argv[1:]]
    torch.save(average([load_state(p) for p in inputs]), out)
    metas = metas or [p.with_suffix(".json") for p in inputs if p.suffix == ".pth"]
    metas = [m for m in metas if m.exists()]
    if metas:
        meta = json.loads(metas[-1].read_text())
        meta["name"] = out.stem
        meta.setdefault("training", {})["averaged_from"] = [
            {"path": str(p), "sha256": file_sha256(p)} for p in inputs
        ]
        out.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"saved {out} (average of {len(inputs)})")


if __name__ == "__main__":
    main(sys.argv[1:])

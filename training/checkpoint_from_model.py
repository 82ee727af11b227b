"""Turn a saved model (``.pth`` + ``.json``) into a training checkpoint to ``--resume`` from.

    python training/checkpoint_from_model.py plugins/cellplug_zoo/weights/generalist.pth \
        runs/generalist6/ckpt

Writes ``checkpoint.pt`` (the model's weights as cellplug's safe loader returns them, i.e.
float32; no optimiser state, so AdamW starts its moment estimates afresh) and
``checkpoint.json`` (the epoch and history recorded in the model's metadata), so that
``cellplug train ... --resume --epochs N`` continues the model's own epoch count and
learning-rate schedule. Used when a run's own checkpoint is gone (e.g. a new machine).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from cellplug.models import load_state_dict


def main(model_pth: str, ckpt_dir: str) -> None:
    src, dst = Path(model_pth), Path(ckpt_dir)
    history = json.loads(src.with_suffix(".json").read_text())["training"]["history"]
    state = load_state_dict(src)
    epoch = int(history[-1]["epoch"])
    dst.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, "epoch": epoch}, dst / "checkpoint.pt")
    (dst / "checkpoint.json").write_text(json.dumps({"epoch": epoch, "history": history}))
    print(f"{src} (epoch {epoch}) -> {dst / 'checkpoint.pt'}")


if __name__ == "__main__":
    main(*sys.argv[1:3])

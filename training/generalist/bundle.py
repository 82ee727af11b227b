"""Copy a finished generalist run into the zoo plugin, with repository-relative metadata.

Usage: python training/generalist/bundle.py [RUN_DIR]   (default: runs/generalist)
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

repo = Path(__file__).resolve().parents[2]
run = Path(sys.argv[1]) if len(sys.argv) > 1 else repo / "runs" / "generalist"
dst = repo / "plugins" / "cellplug_zoo" / "weights"
meta = json.loads((run / "generalist.json").read_text())
meta["name"] = "generalist"
meta.pop("status", None)
meta["training"]["data"]["val_list"] = "training/generalist/val_stems.txt"
shutil.copy(run / "generalist.pth", dst / "generalist.pth")
(dst / "generalist.json").write_text(json.dumps(meta, indent=1) + "\n")
print(f"bundled {run / 'generalist.pth'} -> {dst}")

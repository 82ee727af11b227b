"""Style-specific models of the bundled generalist, for ``--model auto`` (a model pack)."""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"

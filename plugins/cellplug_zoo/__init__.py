"""Bundled pretrained models (weights trained by the cellplug project on shippable data)."""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"

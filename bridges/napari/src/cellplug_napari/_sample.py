"""napari sample data: the example image of cellplug's README."""

from __future__ import annotations

from pathlib import Path
from typing import Any

NUCLEI = Path(__file__).parent / "data" / "nuclei.tif"


def nuclei() -> list[tuple[Any, dict[str, Any], str]]:
    """Fluorescent nuclei, 360 x 360 (dsb2018, CC0 1.0; held out of the bundled model's
    training): the image ``cellplug segment examples/nuclei.tif`` segments in the README."""
    from cellplug.io import read_image

    return [(read_image(NUCLEI), {"name": "nuclei"}, "image")]

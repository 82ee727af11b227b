"""The screenshots of docs/napari.md: the dock widget after segmenting the README's image, and
after correcting it (an object deleted, two merged, one painted).

Needs a display with OpenGL; on a server, run it under Xvfb:

    xvfb-run -a -s "-screen 0 1600x1000x24" \
        python bridges/napari/examples/screenshots.py docs/images
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[3]


def wait(widget, app, timeout: float = 300) -> None:
    """Process Qt events until the widget's job (and any job chained to it) is done."""
    end = time.monotonic() + timeout
    while widget.worker is not None or widget._remask_timer.isActive():
        app.processEvents()
        time.sleep(0.02)
        if time.monotonic() > end:
            raise TimeoutError(widget.status.text())
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)


def centre(labels: np.ndarray, label: int) -> tuple[float, float]:
    ys, xs = np.nonzero(labels == label)
    k = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)
    return float(ys[k]), float(xs[k])


def touching_pair(labels: np.ndarray) -> tuple[int, int]:
    """Two objects that touch (horizontally or vertically), the pair a user would merge."""
    a, b = labels[:, :-1], labels[:, 1:]
    pairs = (a != b) & (a > 0) & (b > 0)
    if not pairs.any():
        a, b = labels[:-1], labels[1:]
        pairs = (a != b) & (a > 0) & (b > 0)
    i = np.argwhere(pairs)[0]
    return int(a[tuple(i)]), int(b[tuple(i)])


def main(out: Path) -> None:
    os.environ.setdefault("CELLPLUG_MODELS", tempfile.mkdtemp(prefix="cellplug-zoo-"))
    import napari
    from qtpy.QtWidgets import QApplication

    out.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="cellplug-napari-"))
    shutil.copy(REPO / "examples" / "nuclei.tif", folder / "nuclei.tif")
    shutil.copy(REPO / "tests" / "data" / "dsb2018_fluo.tif", folder / "dsb2018_fluo.tif")
    viewer = napari.Viewer(title="cellplug in napari")
    viewer.window.resize(1500, 1000)
    _, widget = viewer.window.add_plugin_dock_widget("cellplug-napari",
                                                     "Segment, correct, train")
    app = QApplication.instance()
    widget.open_folder(folder)
    widget.go(+1)  # nuclei.tif, the README's image
    widget.segment()
    wait(widget, app)
    layer = widget.labels_layer
    layer.contour = 0
    viewer.layers.selection.active = layer
    viewer.screenshot(str(out / "napari_segmented.png"), canvas_only=False)

    labels = layer.data
    before = labels.copy()
    keep, other = touching_pair(labels)
    widget.merge_objects(keep, other)
    # delete the object nearest the centre (Shift-D with the cursor over it)
    ids = [int(i) for i in np.unique(labels) if i not in (0, keep)]
    h, w = labels.shape
    gone = min(ids, key=lambda i: np.hypot(*np.subtract(centre(labels, i), (h / 2, w / 2))))
    viewer.cursor.position = centre(labels, gone)
    widget._delete_key(viewer)
    # paint a new object with napari's brush where the background is widest
    from scipy import ndimage

    free = ndimage.distance_transform_edt(np.pad(before == 0, 1, constant_values=False))[1:-1,
                                                                                         1:-1]
    spot = np.unravel_index(np.argmax(free), free.shape)
    new = int(labels.max()) + 1
    layer.selected_label = new
    layer.brush_size = 24
    layer.paint(spot, new)
    layer.mode = "pan_zoom"  # (the brush would draw its outline at the pointer)
    widget.say(f"merged object {other} into {keep}; deleted object {gone}; painted object "
               f"{new} (napari's brush)")
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)
    viewer.screenshot(str(out / "napari_corrected.png"), canvas_only=False)
    viewer.close()
    print(f"wrote {out / 'napari_segmented.png'} and {out / 'napari_corrected.png'}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/images"))

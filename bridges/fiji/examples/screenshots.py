"""Take the screenshots of docs/fiji.md: ImageJ 1.x started by the in-process way, under Xvfb.

    xvfb-run -a -s "-screen 0 1100x640x24" python bridges/fiji/examples/screenshots.py docs/images

Writes fiji-menu.png (Plugins > Cellplug open) and fiji-segmented.png (examples/nuclei.tif
segmented: the ROIs as an overlay, the label image, the ROI Manager). The menus are opened
with java.awt.Robot, as a user's mouse would.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def capture(path: Path, x: int, y: int, w: int, h: int) -> None:
    from java.awt import Rectangle, Robot  # type: ignore
    from java.io import File  # type: ignore
    from javax.imageio import ImageIO  # type: ignore

    ImageIO.write(Robot().createScreenCapture(Rectangle(x, y, w, h)), "png", File(str(path)))
    print(f"wrote {path}")


def main(out: Path) -> None:
    from cellplug_fiji import imagej1

    out.mkdir(parents=True, exist_ok=True)
    bridge = imagej1.start()
    from ij import IJ, WindowManager  # type: ignore
    from ij.plugin.frame import RoiManager  # type: ignore
    from java.awt import Robot  # type: ignore
    from java.awt.event import InputEvent  # type: ignore

    ij = IJ.getInstance()
    ij.setLocation(0, 0)
    imp = IJ.openImage(str(REPO / "examples" / "nuclei.tif"))
    imp.show()
    time.sleep(1)
    imp.getWindow().setLocation(0, 110)
    IJ.run("Segment", "model=generalist diameter=0 cyto=0 nucleus=0 flow=0.4 cellprob=0")
    assert bridge.last_error is None, bridge.last_error
    labels = WindowManager.getImage("nuclei-labels")
    labels.getWindow().setLocation(390, 110)
    RoiManager.getInstance().setLocation(780, 110)
    WindowManager.setCurrentWindow(imp.getWindow())
    time.sleep(2)
    capture(out / "fiji-segmented.png", 0, 0, 1010, 500)

    # Plugins > Cellplug: click "Plugins" in ImageJ's menu bar, then hover over "Cellplug"
    robot = Robot()
    robot.setAutoDelay(150)
    bar = ij.getMenuBar()
    font = ij.getFontMetrics(bar.getFont() or ij.getFont())
    x = 8
    for i in range(bar.getMenuCount()):
        label = str(bar.getMenu(i).getLabel())
        if label == "Plugins":
            break
        x += font.stringWidth(label) + 23  # XToolkit's spacing between menu bar items (measured)
    origin = ij.getLocationOnScreen()
    bar_y = origin.y + ij.getInsets().top // 2  # the menu bar lies within the frame's insets
    plugins = bar.getMenu(i)
    rows = [str(plugins.getItem(k).getLabel()) for k in range(plugins.getItemCount())]
    before = rows[: rows.index("Cellplug")]
    # measured under Xvfb: 19 px per item, 9 px per separator, the first centred 9 px down
    y = (origin.y + ij.getInsets().top + 9 + 19 * sum(r != "-" for r in before)
         + 9 * before.count("-"))
    # press on "Plugins" and drag down to "Cellplug" (XToolkit follows a held button)
    robot.mouseMove(origin.x + x + 10, bar_y)
    robot.mousePress(InputEvent.BUTTON1_DOWN_MASK)
    time.sleep(1)
    for step in range(bar_y, y + 1, 6):
        robot.mouseMove(origin.x + x + 20, step)
    robot.mouseMove(origin.x + x + 40, y)
    time.sleep(1.5)
    capture(out / "fiji-menu.png", 0, 0, 700, 330)
    robot.mouseRelease(InputEvent.BUTTON1_DOWN_MASK)
    robot.keyPress(27)  # Esc closes the menus
    robot.keyRelease(27)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "docs" / "images")

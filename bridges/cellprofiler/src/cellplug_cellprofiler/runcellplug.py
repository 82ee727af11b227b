"""RunCellplug for CellProfiler: the file CellProfiler's plugin loader reads.

Written into a CellProfiler plugins folder by ``cellplug cellprofiler install-plugin DIR`` and
removed by ``cellplug cellprofiler uninstall-plugin DIR``. The module itself is in the Python
package ``cellplug_cellprofiler``, which must be installed in the Python that runs CellProfiler
(``pip install cellplug-cellprofiler``); see docs/cellprofiler.md of cellplug.
"""
# cellplug-cellprofiler plugin file (do not edit: install-plugin replaces it)

import sys

try:
    from cellplug_cellprofiler.module import RunCellplug as _RunCellplug
except ImportError as exc:  # shown by CellProfiler as this plugin's load error
    raise ImportError(
        f"RunCellplug needs the package cellplug-cellprofiler (and cellplug) in the Python "
        f"that runs CellProfiler ({sys.executable}): {exc}"
    ) from exc


class RunCellplug(_RunCellplug):
    # CellProfiler's loader registers the first Module subclass defined in this file; the
    # implementation is imported, so it is defined here again by name.
    __doc__ = _RunCellplug.__doc__

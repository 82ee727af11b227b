"""cellplug-cellprofiler: cellplug as the CellProfiler 5 module RunCellplug.

- :mod:`cellplug_cellprofiler.module`: the module (imports CellProfiler);
- :mod:`cellplug_cellprofiler.runcellplug`: the one-file plugin CellProfiler's plugin loader
  reads from its plugins folder (``cellplug cellprofiler install-plugin DIR`` copies it there);
- :mod:`cellplug_cellprofiler.plugin`: the cellplug plugin adding ``cellplug cellprofiler``.

Importing this package does not import CellProfiler.
"""

__version__ = "0.1.0"

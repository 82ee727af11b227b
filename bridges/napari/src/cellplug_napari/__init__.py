"""cellplug-napari: cellplug in napari (npe2 plugin).

A dock widget to segment, correct, train on the corrections and save them (``_widget``), a
reader for cellplug's outputs (``_reader``) and the README's sample image (``_sample``); the
state without Qt is in :mod:`cellplug_napari.session`, the label edits in
:mod:`cellplug_napari.edits`.
"""

__version__ = "0.1.0"

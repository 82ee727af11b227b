"""cellplug-fiji: cellplug in Fiji and ImageJ, as a ``Plugins > Cellplug`` menu.

Two ways in, sharing the commands (:mod:`cellplug_fiji.commands`) and the conversion
(:mod:`cellplug_fiji.convert`):

- in-process, ``cellplug fiji start``: ImageJ runs inside Python (JPype; pyimagej for a Fiji
  given with ``--fiji-dir``), the menu items are Python callbacks
  (:mod:`cellplug_fiji.imagej1`, :mod:`cellplug_fiji.fiji`);
- standalone, ``cellplug fiji install Fiji.app``: ImageJ macros that run the ``cellplug``
  command line (:mod:`cellplug_fiji.standalone`).

Importing this package starts no JVM.
"""

__version__ = "0.1.0"

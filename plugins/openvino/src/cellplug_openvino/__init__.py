"""cellplug-openvino: the ``openvino`` backbone (see :mod:`cellplug_openvino.runtime`)."""

__version__ = "0.1.0"

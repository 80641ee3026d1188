"""nomoat: one shared language model trained from many people's spare GPUs.

This small package is shared by both sides: the gRPC contract (``nomoat.v1``, generated from
``proto/``), the adapter file format, dataset records, the tiny offline model and the ``nomoat``
command line.
"""

__version__ = "0.1.0"

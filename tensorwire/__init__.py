"""tensorwire's shared library: server wiring, settings, errors, channels, batching,
chunked streaming. It imports no service code. Generated protobuf stubs live in
its subpackages (``tensorwire.trainer.v1``, ``tensorwire.inference``, ...)."""

__version__ = "0.1.0"

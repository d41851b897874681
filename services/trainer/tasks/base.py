"""The Task API lives in the library (:mod:`tensorwire.tasks`, public for task
plugins); the built-in tasks import it from here as they always did."""

from tensorwire.tasks import COMMON_PARAMS, Option, Param, RunConfig, Task

__all__ = ["COMMON_PARAMS", "Option", "Param", "RunConfig", "Task"]

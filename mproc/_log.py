"""The ``mproc`` logger, silent unless the application configures logging (SPEC §8)."""

from __future__ import annotations

import logging

__all__ = ["logger"]

#: Every mproc module logs here. The NullHandler keeps Python's last-resort
#: handler from printing our warnings to stderr when the application has not
#: configured logging; records still propagate to the application's handlers.
logger = logging.getLogger("mproc")
logger.addHandler(logging.NullHandler())

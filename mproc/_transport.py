"""Temporary alias of :mod:`mproc._runtime` while modules move over (removed before release)."""

from ._runtime import *  # noqa: F403
from ._runtime import ENV_RUNTIME_DIR as ENV_RUNTIME_DIR
from ._runtime import runtime_dir as runtime_dir

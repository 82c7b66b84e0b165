"""gridfl: static federated learning.

A data scientist hosts a model and its ONNX training plan on a grid node; workers join
training cycles, run the plan on their private data and report only a model diff.
"""

from gridfl._exceptions import *  # noqa: F403
from gridfl._exceptions import __all__ as _exception_names
from gridfl.client import AsyncJob, AsyncSyft, Job, Syft
from gridfl.model import SyftModel
from gridfl.plan import Plan

__version__ = "0.1.0"

__all__ = ["__version__", "Syft", "AsyncSyft", "Job", "AsyncJob", "SyftModel",
    "Plan", *_exception_names]

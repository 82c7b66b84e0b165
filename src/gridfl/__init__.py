"""gridfl: static federated learning.

A data scientist hosts a model and its ONNX training plan on a grid node; workers join
training cycles, run the plan on their private data and report only a model diff.

The package root is lazy (PEP 562): ``import gridfl`` loads only the exceptions, and
``gridfl.Syft``, ``gridfl.Plan``, ``from gridfl import SyftModel`` ... import the worker
SDK (httpx, websockets, numpy) or the plan module on first use. A grid node or the CLI
that never touches them does not pay for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gridfl._exceptions import *  # noqa: F403
from gridfl._exceptions import __all__ as _exception_names
from gridfl._lazy import lazy_attributes as _lazy_attributes

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time, __getattr__ below
    from gridfl.client import AsyncJob, AsyncSyft, Job, Syft
    from gridfl.model import SyftModel
    from gridfl.plan import Plan

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first access)
_LAZY = {
    "Syft": "gridfl.client",
    "AsyncSyft": "gridfl.client",
    "Job": "gridfl.client",
    "AsyncJob": "gridfl.client",
    "SyftModel": "gridfl.model",
    "Plan": "gridfl.plan",
}

__all__ = ["__version__", "Syft", "AsyncSyft", "Job", "AsyncJob", "SyftModel",
    "Plan", *_exception_names]


__getattr__, __dir__ = _lazy_attributes(globals(), _LAZY)

"""The contrastive methods, one module each; ``train.method`` names one of them.

A module here that defines a :class:`~contrastive.methods.base.Method` subclass with a ``name``
registers it: a new method is one file in this folder and one entry in the config.
"""

from __future__ import annotations

import importlib
import pkgutil

from torch import nn

from contrastive.config import Params
from contrastive.methods.base import REGISTRY, Method, MethodInputs

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def build(encoder: nn.Module, params: Params, inputs: MethodInputs | None = None) -> Method:
    """The method named by ``params.train.method``, around ``encoder``."""
    return REGISTRY[params.train.method].from_params(encoder, params, inputs or MethodInputs())


__all__ = ["REGISTRY", "Method", "MethodInputs", "build"]

"""nnU-Net trainer subclasses (installed as ``nnunet_ssl.trainers``); file name == class name.

``TRAINERS`` lists every trainer class this package defines (bases and variants) by name; the
index module in ``nnunet_ssl/nnunet_ext`` re-exports them for nnU-Net's ``nnUNet_extTrainer`` scan.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil


def all_trainers() -> dict:
    """``{class name: class}`` of every nnU-Net trainer defined in this package."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    found = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for name, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, nnUNetTrainer) and obj.__module__ == module.__name__:
                found[name] = obj
    return found

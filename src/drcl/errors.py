"""Errors users can act on.

A :class:`DataError` carries a one-line message that names the file and the record
(image / annotation / category id). The CLI prints it as ``error: <message>`` and exits
with code 2 instead of showing a traceback.

A :class:`MissingDependency` says which optional package a feature needs. drcl needs the torch
stack, numpy, Pillow, PyYAML and tqdm throughout; faster-coco-eval (evaluation, Mask R-CNN
masks), matplotlib (plots) and tensorboard (training curves) are imported where they are used,
through :func:`import_optional`, so a source tree runs on a machine that lacks them until a
command needs one.
"""

from __future__ import annotations

import importlib


class DataError(Exception):
    """Bad input data: malformed JSON, missing keys, bad boxes, unreadable images."""

    exit_code = 2


class MissingDependency(Exception):
    """An optional package that a feature needs is not installed."""

    exit_code = 2


def import_optional(module: str, feature: str, package: str | None = None):
    """``module``, imported; if its package is not installed, a :class:`MissingDependency` whose
    one line names ``feature`` and the package to install (``package``, by default the top-level
    module name with ``-`` for ``_``). An installed package that fails to import raises as is."""
    package = package or module.split(".")[0].replace("_", "-")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != package.replace("-", "_"):
            raise
        raise MissingDependency(f"{feature} needs {package}: pip install {package}") from None

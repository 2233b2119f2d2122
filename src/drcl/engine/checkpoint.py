"""Checkpoints, written atomically (:func:`drcl.atomic.atomic_write`): a process killed at
any moment leaves either the previous checkpoint or the new one, never half a file."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from drcl.atomic import atomic_write
from drcl.errors import DataError
from drcl.model.drcl import ENCODER_PREFIX


def save_checkpoint(obj: dict, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


def cpu_state_dict(state: dict) -> dict:
    """``state`` with every tensor detached and on the CPU: weights meant for other programs
    (``encoder.pt``, ``classifier.pt``) load with a plain ``torch.load`` on a machine without
    the GPU they were trained on."""
    return {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in state.items()}


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`; a missing or unreadable file is
    a one-line :class:`DataError`."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many kinds for a damaged file
        raise DataError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`. CUDA states are restored for the GPUs this process has, the
    first ``torch.cuda.device_count()`` of them: a run resumed with fewer GPUs visible than
    the one that saved (``torch.cuda.set_rng_state_all`` fails there) or on none goes on."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


def run_weights_path(path: str | os.PathLike) -> Path:
    """A run folder's weights (``encoder.pt`` if it has one, else ``checkpoints/last.pt``);
    any other path as it is."""
    path = Path(path)
    if path.is_dir():
        path = path / "encoder.pt" if (path / "encoder.pt").exists() else path / "checkpoints" / "last.pt"
    return path


def strip_encoder(model_state: dict) -> dict:
    """The online encoder's weights out of a 2DRCL model state dict, under torchvision keys."""
    return {k[len(ENCODER_PREFIX):]: v for k, v in model_state.items() if k.startswith(ENCODER_PREFIX)}


def encoder_weights(path: str | os.PathLike) -> dict:
    """Backbone / FPN / box-head weights under torchvision keys from a 2DRCL run's
    ``encoder.pt`` or ``checkpoints/last.pt`` (or a run folder holding either)."""
    path = run_weights_path(path)
    state = load_checkpoint(path)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        sd = strip_encoder(state["model"])
        if not sd:
            raise DataError(f"{path}: a checkpoint without 2DRCL encoder weights (no '{ENCODER_PREFIX}*' keys)")
        return sd
    if isinstance(state, dict) and any(k.startswith("backbone.body.") for k in state):
        return state
    raise DataError(f"{path}: neither a drcl pretrain checkpoint nor encoder weights")

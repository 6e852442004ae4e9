"""Reading checkpoint folders (safetensors, PyTorch .bin, sharded with an index) with errors
that name the file and key."""
from __future__ import annotations

import json
import os

import torch


class CheckpointError(ValueError):
    pass


def read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: no config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def weight_files(folder: str) -> list[str]:
    """The files holding the weights, following an index file when the checkpoint is sharded."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(folder, index_name)
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
            if missing:
                raise CheckpointError(f"{index}: shard {missing[0]} is missing")
            return [os.path.join(folder, s) for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(folder, name)):
            return [os.path.join(folder, name)]
    found = sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".bin", ".pt")))
    if found:
        return [os.path.join(folder, f) for f in found]
    raise CheckpointError(f"{folder}: no weights (*.safetensors, *.bin)")


def load_file(path: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file as st_load
            return st_load(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or truncated files raise many types; name the file
        raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {str(e)[:120]})") from e


def load_state_dict(folder: str) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        state.update(load_file(path))
    return state


def check_keys(state: dict, expected: dict[str, tuple], where: str, optional: set[str] = frozenset()) -> None:
    """expected: key -> shape.  Raises naming the first missing/unexpected key or wrong shape."""
    missing = [k for k in expected if k not in state and k not in optional]
    if missing:
        raise CheckpointError(f"{where}: missing key {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = [k for k in state if k not in expected]
    if extra:
        raise CheckpointError(f"{where}: unexpected key {extra[0]}" + (f" (+{len(extra) - 1} more)" if len(extra) > 1 else ""))
    for k, shape in expected.items():
        if k in state and tuple(state[k].shape) != tuple(shape):
            raise CheckpointError(f"{where}: key {k} has shape {tuple(state[k].shape)}, expected {tuple(shape)}")

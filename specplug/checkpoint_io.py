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


# -- writing ----------------------------------------------------------------------------------
DEFAULT_SHARD_BYTES = 5 * 1024**3  # what HF save_pretrained uses by default
PROGRESS_BYTES = 256 * 1024**2  # show a progress bar above this


def save_state_dict(state: dict[str, torch.Tensor], folder: str,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
    """Write safetensors: one model.safetensors, or model-0000i-of-0000n.safetensors shards plus
    model.safetensors.index.json when the total is above max_shard_bytes.  Returns file names."""
    from safetensors.torch import save_file
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        t = state[key]
        # safetensors refuses views and tensors sharing storage: give each its own memory
        t = t.detach().contiguous().clone() if _is_view(t) else t.detach().contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    total = sum(t.numel() * t.element_size() for t in state.values())
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    bar = _progress(total, "writing")
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        if bar is not None:
            bar.update(sum(t.numel() * t.element_size() for t in shard.values()))
    if bar is not None:
        bar.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
        names.append("model.safetensors.index.json")
    return names


def _is_view(t: torch.Tensor) -> bool:
    return t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.numel() * t.element_size()


def _progress(total_bytes: int, desc: str):
    if total_bytes < PROGRESS_BYTES:
        return None
    from tqdm import tqdm
    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc)


class StagedFolder:
    """Build a folder under a temporary name next to its destination; move it into place only
    when everything is written, so a failure leaves nothing behind (and an old DST untouched)."""

    def __init__(self, dst: str, overwrite: bool = False):
        self.dst = os.path.abspath(dst)
        if os.path.exists(self.dst) and not overwrite:
            raise CheckpointError(f"{dst} already exists (pass --force to replace it)")
        parent = os.path.dirname(self.dst)
        if not os.path.isdir(parent):
            raise CheckpointError(f"parent folder of {dst} does not exist")
        self.tmp = os.path.join(parent, f".{os.path.basename(self.dst)}.tmp-{os.getpid()}")

    def __enter__(self) -> str:
        import shutil
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.makedirs(self.tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        import shutil
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if os.path.exists(self.dst):  # --force: swap, then drop the old one
            old = self.tmp + ".old"
            os.rename(self.dst, old)
        os.rename(self.tmp, self.dst)
        if old:
            shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)
        return False

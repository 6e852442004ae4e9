"""Rebuild the drafters shipped under specplug/assets/drafters from scratch, deterministically.

Each recipe names every setting (data, vocabulary, steps, seed); running it again on the same
target and thread count gives the same weights, since data order, initialisation and the step
count are all fixed (no wall-clock limits).  `specplug train rebuild-all` runs them in order;
interrupted runs resume from their data chunks and training checkpoints.
"""
from __future__ import annotations

import os
import shutil

# name -> settings; the README line in each asset folder is written from the same dict
RECIPES = {
    "smollm2-eagle3": {
        "family": "eagle3",
        "data": {"source": "reference", "num_prompts": 256, "prompts_per_chunk": 32,
                 "batch_size": 8, "max_prompt_tokens": 256, "max_len": 320, "dtype": "bfloat16"},
        "train": {"draft_vocab": 8192, "steps": 100, "batch_size": 4, "seq_len": 192,
                  "ttt_steps": 2, "lr": 2e-3, "seed": 0, "bf16_autocast": True},
    },
}


def assets_dir() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "drafters")


def work_dir() -> str:
    from ..models.prepare import cache_dir
    return os.path.join(cache_dir(), "training")


def rebuild(name: str, target: str, work: str | None = None, assets: str | None = None,
            progress: bool = True) -> str:
    from .data import DataConfig, generate_data
    from .eagle3_train import Eagle3TrainConfig, train_eagle3
    recipe = RECIPES[name]
    work = work or work_dir()
    data_dir = os.path.join(work, f"{name}-data")
    train_dir = os.path.join(work, f"{name}-train")
    generate_data(DataConfig(target, data_dir, **recipe["data"]), progress=progress)
    if recipe["family"] != "eagle3":
        raise ValueError(f"recipe {name}: family {recipe['family']} has no trainer yet")
    train_eagle3(Eagle3TrainConfig(target, data_dir, train_dir, progress=progress, **recipe["train"]))
    return install(name, train_dir, assets)


def install(name: str, trained: str, assets: str | None = None) -> str:
    """Copy config.json + model.safetensors of a trained folder into the assets, with a README."""
    out = os.path.join(assets or assets_dir(), name)
    os.makedirs(out, exist_ok=True)
    for f in ("config.json", "model.safetensors"):
        src = os.path.join(trained, f)
        if not os.path.isfile(src):
            raise FileNotFoundError(f"{src} missing: train {name} first")
        shutil.copyfile(src, os.path.join(out, f))
    recipe = RECIPES[name]
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(f"# {name}\n\n{readme_line(name, recipe)}\n")
    return out


def readme_line(name: str, recipe: dict) -> str:
    d, t = recipe["data"], recipe["train"]
    return (f"{recipe['family']} drafter for SmolLM2-135M-Instruct, trained on CPU by "
            f"`specplug train rebuild-all` (recipe `{name}` in specplug/training/rebuild.py): "
            f"data = {d['num_prompts']} ShareGPT conversations, source '{d['source']}' "
            f"(target features over prompt + reference answer, <= {d['max_len']} tokens), "
            f"{t['steps']} steps x {t['batch_size']} sequences of <= {t['seq_len']} tokens, "
            f"TTT {t['ttt_steps']}, draft vocab {t['draft_vocab']}, lr {t['lr']}, seed {t['seed']}; "
            f"weights bf16; loss = CE to the target's distribution.")


def rebuild_all(target: str, work: str | None = None, assets: str | None = None) -> list[str]:
    return [rebuild(name, target, work, assets) for name in RECIPES]

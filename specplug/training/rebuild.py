"""Rebuild the drafters shipped under specplug/assets/drafters from scratch, deterministically.

Each recipe names every setting (data, vocabulary, steps, seed); running it again on the same
target and thread count gives the same weights, since data order, initialisation and the step
count are all fixed (no wall-clock limits).  `specplug train rebuild-all` runs them in order;
interrupted runs resume from their data chunks and training checkpoints.
"""
from __future__ import annotations

import json
import os
import shutil

# name -> settings; the README line in each asset folder is written from the same dict
RECIPES = {
    "smollm2-eagle3": {
        "family": "eagle3",
        # data folders, each resumable on its own: the target reading ShareGPT's answers
        # (cheap prefill) and the target answering other ShareGPT prompts itself (decoding)
        "data": {
            "reference": {"source": "reference", "num_prompts": 512, "prompts_per_chunk": 32,
                          "batch_size": 8, "max_prompt_tokens": 256, "max_len": 320,
                          "dtype": "bfloat16"},
            "self": {"source": "self", "num_prompts": 224, "prompts_per_chunk": 16,
                     "batch_size": 16, "max_prompt_tokens": 192, "max_new_tokens": 160,
                     "dtype": "bfloat16", "skip_prompts": 1000},
        },
        "train": {"draft_vocab": 8192, "steps": 480, "stop_at": 300, "batch_size": 4,
                  "seq_len": 192, "ttt_steps": 2, "answer_context": 32, "lr": 2e-3, "seed": 0,
                  "bf16_autocast": True},
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
    data_dirs = []
    for part, settings in recipe["data"].items():
        data_dirs.append(os.path.join(work, f"{name}-data-{part}"))
        generate_data(DataConfig(target, data_dirs[-1], **settings), progress=progress)
    if recipe["family"] != "eagle3":
        raise ValueError(f"recipe {name}: family {recipe['family']} has no trainer yet")
    train_dir = os.path.join(work, f"{name}-train")
    train_eagle3(Eagle3TrainConfig(target, ",".join(data_dirs), train_dir, progress=progress,
                                   **recipe["train"]))
    return install(name, train_dir, assets)


def install(name: str, trained: str, assets: str | None = None) -> str:
    """Copy config.json + model.safetensors of a trained folder into the assets, with a README."""
    out = os.path.join(assets or assets_dir(), name)
    os.makedirs(out, exist_ok=True)
    for f in ("config.json", "model.safetensors"):
        src = os.path.join(trained, f)
        if not os.path.isfile(src):
            raise FileNotFoundError(f"{src} missing: train {name} first")
    shutil.copyfile(os.path.join(trained, "model.safetensors"), os.path.join(out, "model.safetensors"))
    with open(os.path.join(trained, "config.json")) as f:
        cfg = json.load(f)
    # local paths of the machine that trained it mean nothing elsewhere
    train_cfg = cfg.get("specplug_training", {}).get("train_config", {})
    for key in ("target", "data", "output", "progress"):
        train_cfg.pop(key, None)
    cfg.setdefault("specplug_training", {})["recipe"] = name
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    recipe = RECIPES[name]
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(f"# {name}\n\n{readme_line(name, recipe)}\n")
    return out


def readme_line(name: str, recipe: dict) -> str:
    t = recipe["train"]
    parts = "; ".join(f"{d['num_prompts']} ShareGPT prompts, source '{d['source']}'"
                      for d in recipe["data"].values())
    return (f"{recipe['family']} drafter for SmolLM2-135M-Instruct, trained on CPU by "
            f"`specplug train rebuild-all` (recipe `{name}` in specplug/training/rebuild.py): "
            f"data = {parts} ('reference': the target reads prompt + ShareGPT's answer; 'self': "
            f"the target's own greedy answers), features of hidden_states "
            f"[2, 15, 27] + final; {t.get('stop_at') or t['steps']} steps of a {t['steps']}-step "
            f"schedule x {t['batch_size']} sequences of <= "
            f"{t['seq_len']} tokens starting {t.get('answer_context')} tokens before the answer, "
            f"TTT {t['ttt_steps']}, draft vocab {t['draft_vocab']}, lr {t['lr']}, seed {t['seed']}; "
            f"weights bf16; loss = CE to the target's distribution.")


def rebuild_all(target: str, work: str | None = None, assets: str | None = None) -> list[str]:
    return [rebuild(name, target, work, assets) for name in RECIPES]

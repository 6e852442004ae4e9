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

# data sets shared by every recipe, each resumable on its own: the target reading ShareGPT's
# answers (cheap prefill) and the target answering other ShareGPT prompts itself (decoding)
DATA = {
    "reference": {"source": "reference", "num_prompts": 512, "prompts_per_chunk": 32,
                  "batch_size": 8, "max_prompt_tokens": 256, "max_len": 320, "dtype": "bfloat16"},
    "self": {"source": "self", "num_prompts": 224, "prompts_per_chunk": 16, "batch_size": 16,
             "max_prompt_tokens": 192, "max_new_tokens": 160, "dtype": "bfloat16",
             "skip_prompts": 1000},
}

# name -> settings; the README line in each asset folder is written from the same dict
RECIPES = {
    "smollm2-eagle3": {
        "family": "eagle3",
        "data": ["reference", "self"],
        "train": {"draft_vocab": 8192, "steps": 480, "stop_at": 300, "batch_size": 4,
                  "seq_len": 192, "ttt_steps": 2, "answer_context": 32, "lr": 2e-3, "seed": 0,
                  "bf16_autocast": True},
    },
    "smollm2-draft": {
        "family": "draft",
        "data": ["reference"],
        "train": {"hidden_size": 192, "num_layers": 2, "num_heads": 3, "num_kv_heads": 1,
                  "intermediate_size": 512, "embed_init": "pca", "steps": 300, "batch_size": 4,
                  "seq_len": 256, "answer_context": 64, "ce_weight": 0.0, "teacher_top_k": 32,
                  "lr": 3e-3, "seed": 0, "bf16_autocast": True, "save_every": 25},
    },
    "smollm2-specdiff": {
        "family": "diffusion",
        "data": ["reference"],
        # stop_at: the shipped run stopped at 784 of its 800-step schedule
        "train": {"hidden": 192, "layers": 4, "heads": 3, "intermediate": 512, "causal": False,
                  "gamma": 5, "denoise_steps": None, "unmask_order": "entropy", "max_context": 96,
                  "alpha": 0.8, "collect_every_n_steps": 4, "teacher_topk": 0, "steps": 800,
                  "stop_at": 784, "batch_size": 16, "lr": 2e-3, "seed": 0, "bf16_autocast": True},
    },
    "smollm2-dflash": {
        "family": "dflash",
        "data": ["reference"],
        "train": {"layers": 2, "block_size": 6, "anchors": 16, "mask_token_id": None,
                  "intermediate_size": None, "steps": 1200, "stop_at": None, "batch_size": 4,
                  "seq_len": 256, "answer_context": 64, "loss_decay": 4.0, "train_vocab": 8192,
                  "lr": 2e-3, "seed": 0, "bf16_autocast": True},
    },
}


def assets_dir() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "drafters")


def work_dir() -> str:
    from ..models.prepare import cache_dir
    return os.path.join(cache_dir(), "training")


def data_dir(work: str, part: str) -> str:
    return os.path.join(work, f"smollm2-data-{part}")


def train_recipe(name: str, target: str, data: str, output: str, progress: bool = True) -> str:
    """Run recipe `name`'s trainer on comma-separated data folders; returns the export folder."""
    recipe = RECIPES[name]
    family = recipe["family"]
    if family == "eagle3":
        from .eagle3_train import Eagle3TrainConfig, train_eagle3
        return train_eagle3(Eagle3TrainConfig(target, data, output, progress=progress,
                                              **recipe["train"]))
    from .cli import TRAINER_MODULES, trainer_module
    if family not in TRAINER_MODULES:
        raise ValueError(f"recipe {name}: family {family!r} has no trainer")
    module = trainer_module(family)
    return module.train(module.Config(target=target, data=data, output=output, progress=progress,
                                      **recipe["train"]))


def rebuild(name: str, target: str, work: str | None = None, assets: str | None = None,
            progress: bool = True) -> str:
    from .data import DataConfig, generate_data
    recipe = RECIPES[name]
    work = work or work_dir()
    data_dirs = []
    for part in recipe["data"]:  # "NAME" or "NAME@N": the first N chunks of data set NAME
        name_, at, count = part.partition("@")
        folder = data_dir(work, name_)
        generate_data(DataConfig(target, folder, **DATA[name_]), progress=progress)
        data_dirs.append(folder + at + count)
    train_dir = os.path.join(work, f"{name}-train")
    train_recipe(name, target, ",".join(data_dirs), train_dir, progress)
    return install(name, train_dir, assets)


# what an export folder holds that a drafter loader reads (checkpoints and logs stay behind)
EXPORT_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                "chat_template.jinja")


def install(name: str, trained: str, assets: str | None = None) -> str:
    """Copy the export files of a trained folder into the assets, with a README."""
    out = os.path.join(assets or assets_dir(), name)
    for f in ("config.json", "model.safetensors"):
        src = os.path.join(trained, f)
        if not os.path.isfile(src):
            raise FileNotFoundError(f"{src} missing: train {name} first")
    os.makedirs(out, exist_ok=True)
    for f in EXPORT_FILES[1:]:
        if os.path.isfile(os.path.join(trained, f)):
            shutil.copyfile(os.path.join(trained, f), os.path.join(out, f))
    with open(os.path.join(trained, "config.json")) as f:
        cfg = json.load(f)
    # local paths of the machine that trained it mean nothing elsewhere
    info = cfg.get("specplug_training", {})
    train_cfg = info.get("train_config", info.get("config", {}))
    if isinstance(train_cfg, dict):
        for key in ("target", "data", "output", "progress"):
            train_cfg.pop(key, None)
    cfg.setdefault("specplug_training", {})["recipe"] = name
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(f"# {name}\n\n{readme_line(name, RECIPES[name])}\n")
    return out


def readme_line(name: str, recipe: dict) -> str:
    def describe(part: str) -> str:
        name_, at, count = part.partition("@")
        d = DATA[name_]
        cut = f" (first {int(count) * d['prompts_per_chunk']})" if at else ""
        return f"{d['num_prompts']} ShareGPT prompts{cut}, source '{d['source']}'"
    parts = "; ".join(describe(p) for p in recipe["data"])
    settings = ", ".join(f"{k}={v}" for k, v in recipe["train"].items())
    return (f"{recipe['family']} drafter for SmolLM2-135M-Instruct, trained on CPU by "
            f"`specplug train rebuild-all` (recipe `{name}` in specplug/training/rebuild.py): "
            f"data = {parts} ('reference': the target reads prompt + ShareGPT's answer; 'self': "
            f"the target's own greedy answers) with target features of hidden_states "
            f"[2, 15, 27] + final; training settings: {settings}; weights stored in bf16.")


def rebuild_all(target: str, work: str | None = None, assets: str | None = None) -> list[str]:
    return [rebuild(name, target, work, assets) for name in RECIPES]

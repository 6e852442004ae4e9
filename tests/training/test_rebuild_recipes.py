"""The rebuild recipes stay in step with their trainers and with the shipped drafters."""
import dataclasses
import os

import pytest

from specplug.training.rebuild import DATA, RECIPES, assets_dir, readme_line


def _config_fields(family: str) -> set[str]:
    if family == "eagle3":
        from specplug.training.eagle3_train import Eagle3TrainConfig as cfg
    else:
        from specplug.training.cli import trainer_module
        cfg = trainer_module(family).Config
    return {f.name for f in dataclasses.fields(cfg)}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_names_only_settings_its_trainer_has(name):
    recipe = RECIPES[name]
    unknown = set(recipe["train"]) - _config_fields(recipe["family"])
    assert not unknown, f"{name}: {sorted(unknown)}"
    assert all(part.partition("@")[0] in DATA for part in recipe["data"])
    assert "rebuild-all" in readme_line(name, recipe)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_is_shipped_small(name):
    folder = os.path.join(assets_dir(), name)
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    assert os.path.isfile(os.path.join(folder, "model.safetensors"))
    assert size <= 25 * 2 ** 20, f"{name}: {size / 2 ** 20:.1f} MiB"


def test_the_demo_drafter_is_a_shipped_one():
    from specplug.demo import best_drafter
    from specplug.drafters.base import available_methods
    method, path, options = best_drafter()
    assert method in available_methods()
    assert path is None or os.path.isfile(os.path.join(path, "model.safetensors"))
    assert os.path.basename(path or "") in set(RECIPES) | {""}
    assert all(isinstance(k, str) for k in options)

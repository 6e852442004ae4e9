"""Drafter cards: how a specplug algorithm in SGLang gets its drafter's folder and options.

SGLang 0.5.23 has no server argument a custom algorithm may read, so the options travel in the
one it does pass along, --speculative-draft-model-path.  The folder it names may hold a
specplug.json, the drafter block both plugins read (specplug/drafter_block.py):

    {"path": "/drafters/head", "options": {"lookup": "suffix"}, "budget": true}

"path" is the drafter's checkpoint folder (relative to the card, or absolute); without one the
folder itself is the drafter, so a checkpoint folder with a specplug.json beside its config.json
is a card too.  A folder without specplug.json is a drafter with no options.  SGLang reads the
folder's config.json with transformers' AutoConfig, so a card written here carries a minimal
one: that also lets path-less drafters (suffix, ngram) and folders AutoConfig rejects (a Dream
diffusion LM saved without its remote code) be named.

    specplug sglang-card CARD --method suffix --option tree_nodes=16 --budget
    python -m sglang.launch_server ... --speculative-algorithm SPECPLUG_SUFFIX \
        --speculative-draft-model-path CARD
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Iterator

from specplug.drafter_block import DrafterBlock, parse_block
from specplug.drafters.base import family_of

CARD_FILE = "specplug.json"
# what SGLang's own config reads find in a card (the architecture matches none of its models)
CARD_CONFIG = {"model_type": "llama", "architectures": ["SpecplugDrafterCard"]}


def read_card(folder: str | None) -> DrafterBlock:
    """What --speculative-draft-model-path says: its specplug.json, else the folder itself as
    the drafter, with no options."""
    if not folder:
        return DrafterBlock(None, None, {}, False)
    file = os.path.join(folder, CARD_FILE)
    if not os.path.isfile(file):
        return DrafterBlock(None, folder, {}, False)
    try:
        with open(file) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not JSON: {e}") from e
    card = parse_block(raw, file, method_required=False)
    path = os.path.join(folder, card.path) if card.path else folder  # join keeps absolute paths
    return DrafterBlock(card.method, path, card.options, card.budget)


def card_needed(method: str | None, options: dict | None, budget: bool) -> bool:
    """Whether running `method` in specplug's SGLang worker needs a card: options to carry, the
    budget, or a drafter folder SGLang cannot read (Family.sglang_needs_card)."""
    if method in (None, "none"):
        return False
    return bool(options) or budget or family_of(method).sglang_needs_card


def write_card(folder: str, block: DrafterBlock) -> str:
    """A new card at `folder` (absent or empty): config.json + specplug.json, written aside and
    moved into place, so a failure leaves nothing half-written."""
    if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
        raise ValueError(f"{folder} exists and is not an empty folder; a card needs a new one")
    if block.path and not os.path.isdir(block.path):
        raise ValueError(f"drafter folder {block.path} does not exist")
    # the drafter's own folder, absolute: a card can then be moved without breaking its path
    block = DrafterBlock(block.method, block.path and os.path.abspath(block.path),
                         block.options, block.budget)
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".specplug-card-", dir=parent)
    try:
        for name, content in (("config.json", CARD_CONFIG), (CARD_FILE, block.to_dict())):
            with open(os.path.join(staging, name), "w") as f:
                json.dump(content, f, indent=2)
        if os.path.isdir(folder):
            os.rmdir(folder)  # empty (checked above): os.replace wants it gone
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


@contextlib.contextmanager
def temporary_card(block: DrafterBlock) -> Iterator[str]:
    """A card for one run (specplug generate --engine sglang, the benchmarks), removed after."""
    with tempfile.TemporaryDirectory(prefix="specplug-card-") as tmp:
        yield write_card(os.path.join(tmp, "card"), block)

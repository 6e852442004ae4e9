"""The one Drafter interface and the registry that maps method names to drafter factories."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..types import DraftInput, DraftProposal, DrafterNeeds


@dataclass
class TargetInfo:
    """What a drafter may borrow from the target, whichever engine runs it."""
    config: Any  # the target's HF config
    tokenizer: Any = None  # HF tokenizer, needed by drafters with another tokenizer
    embed_tokens: torch.nn.Module | None = None  # shared by EAGLE/DFlash heads
    lm_head: torch.nn.Module | None = None
    final_norm: torch.nn.Module | None = None
    dtype: torch.dtype = torch.float32
    # where the target runs: every drafter keeps its weights, caches and per-step tensors here
    device: torch.device = torch.device("cpu")

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers


class Drafter(ABC):
    """Proposes draft tokens for a batch of rows; keeps whatever per-row state it wants.

    A drafter reconciles its state with `DraftInput.token_ids` on every call (e.g. crops its KV
    cache to what is still a prefix of the committed tokens), so engines never tell it what was
    accepted: rollback falls out of the committed tokens themselves.  Engines that count the
    tokens committed since a row's last call (`num_new_committed`) let it look at those alone
    (row_slots.surviving_prefix), so a step costs O(new tokens), not O(context).
    """
    needs: DrafterNeeds = DrafterNeeds()
    # its proposals carry DraftProposal.scores: a speculation budget lets it draft in full and
    # keeps the best nodes by them, instead of limiting it beforehand from past acceptance
    scores_nodes: bool = False

    @abstractmethod
    def propose(self, inp: DraftInput) -> DraftProposal:
        """Draft tokens after each row's last committed token (target vocabulary)."""

    def release(self, row_ids: list[int]) -> None:
        """Forget finished rows."""

    def torch_modules(self) -> list[torch.nn.Module]:
        """The nn.Modules this drafter runs (its own and the target's it borrowed): those held
        as attributes, and those of drafters it holds (hybrid's lookup and head)."""
        found = []
        for value in vars(self).values():
            if isinstance(value, torch.nn.Module):
                found.append(value)
            elif isinstance(value, Drafter):
                found += value.torch_modules()
        return found


@dataclass
class DrafterSpec:
    method: str
    path: str | None = None  # checkpoint folder, when the method has weights
    options: dict = field(default_factory=dict)  # method-specific settings (tree sizes, k, ...)


_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def option_is_set(value, name: str = "option") -> bool:
    """An on/off option as it arrives (a bool, or text from a command line or a JSON block).
    Anything else is an error: a misspelt value must not quietly mean off."""
    text = str(value).lower()
    if text not in _ON + _OFF:
        raise ValueError(f"{name} must be on or off (also 1/0, true/false, yes/no), got {value!r}")
    return text in _ON


@dataclass(frozen=True)
class Family:
    """The facts about one drafter family that the rest of specplug asks for, declared once in
    that family's own file (`@register_drafter(Family(...))`).  Nothing else keeps a list."""
    method: str  # --method / DrafterSpec.method
    needs_weights: bool  # the drafter is a checkpoint folder (--drafter PATH)
    reads_hidden_states: bool  # it (or, for hybrid, its head) reads target features
    architectures: tuple[str, ...] = ()  # config.json architectures that name this family
    speculators_type: str | None = None  # speculators_model_type of its speculators checkpoints
    vllm_method: str | None = None  # vLLM's own method for its checkpoints (speculative_config)
    # vLLM's own checkpoint-free method of the same idea: what option native=1 runs instead of
    # specplug's drafter (a benchmark's comparison arm)
    vllm_lookup_method: str | None = None
    sglang_algorithm: str | None = None  # SGLang's own worker for its converted checkpoints
    sglang_plugin_name: str | None = None  # SPECPLUG_* algorithm when specplug's worker serves it
    # SGLang reads --speculative-draft-model-path with AutoConfig; a folder it cannot read is
    # named from a drafter card (integrations/sglang/drafter_card.py) instead
    sglang_needs_card: bool = False
    # draft tokens per step where the user names none: a lookup whose proposals stop by
    # themselves (suffix: path probability, match length) can be given a long cap
    default_gamma: int = 5


_REGISTRY: dict[str, tuple[Family, Callable[[DrafterSpec, TargetInfo], Drafter]]] = {}


def register_drafter(family: Family):
    def deco(factory):
        _REGISTRY[family.method] = (family, factory)
        return factory
    return deco


def families() -> list[Family]:
    """Every registered family, in BUILTIN_FAMILIES order (then any registered later)."""
    _load_builtin()
    return [family for family, _ in _REGISTRY.values()]


def family_of(method: str) -> Family:
    _load_builtin()
    if method not in _REGISTRY:
        raise ValueError(f"unknown method {method!r}; known: none, {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[method][0]


def gamma_for(method: str | None, gamma: int | None) -> int:
    """The draft tokens per step a run uses: the user's, else the method's default."""
    if gamma is not None:
        return gamma
    if method in (None, "none"):
        return Family.default_gamma
    return family_of(method).default_gamma


def available_methods() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def build_drafter(spec: DrafterSpec, target: TargetInfo) -> Drafter:
    from ..models.packed_linear import pack_linears
    family_of(spec.method)  # a one-line error for an unknown method
    drafter = _REGISTRY[spec.method][1](spec, target)
    for module in drafter.torch_modules():  # CPU linears on packed weights, in every engine
        pack_linears(module)
    return drafter


def _load_builtin() -> None:
    # importing the family modules runs their @register_drafter (so registry order follows
    # BUILTIN_FAMILIES); kept lazy so importing the core costs nothing
    import importlib
    for name in BUILTIN_FAMILIES:
        try:
            importlib.import_module(f"specplug.drafters.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"specplug.drafters.{name}":
                raise


BUILTIN_FAMILIES = ("ngram", "suffix", "draft_model", "eagle", "eagle3", "dflash", "specdiff",
                    "hybrid")

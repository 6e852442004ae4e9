"""`specplug sglang-card CARD`: write a drafter card (drafter_card.py) for SGLang's
--speculative-draft-model-path, the way options reach specplug's algorithms in SGLang.

    specplug sglang-card /srv/cards/suffix16 --method suffix --option tree_nodes=16 --budget
    specplug sglang-card /srv/cards/hybrid --method hybrid --drafter /srv/heads/e3 \
        --option lookup=suffix
"""
from __future__ import annotations

import argparse
import sys

from specplug.drafter_block import DrafterBlock
from specplug.drafters.base import family_of

from .algorithms import algorithm_for
from .drafter_card import write_card


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specplug sglang-card",
                                description="write a drafter card for SGLang's "
                                            "--speculative-draft-model-path")
    p.add_argument("card", help="the card's folder (new, or empty)")
    p.add_argument("--method", required=True, help="the specplug drafter the card is for")
    p.add_argument("--drafter", help="the drafter's checkpoint folder (families with weights)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a drafter option (repeatable)")
    p.add_argument("--budget", action=argparse.BooleanOptionalAction, default=False,
                   help="the speculation budget picks each step's draft length (default: off)")
    return p


def card_block(method: str, drafter: str | None, options: dict, budget: bool) -> DrafterBlock:
    """The block a card for `method` holds; a one-line error for what SGLang could not run."""
    family = family_of(method)
    algorithm_for(method, native=False)  # a one-line ValueError where specplug's worker has none
    if family.needs_weights and not drafter:
        raise ValueError(f"method {method!r} needs --drafter (its checkpoint folder)")
    if drafter and not family.needs_weights:
        raise ValueError(f"method {method!r} has no weights: drop --drafter {drafter}")
    if "budget" in options:
        raise ValueError("the budget is --budget / --no-budget, not an --option")
    return DrafterBlock(method, drafter, options, budget)


def main(argv: list[str] | None = None) -> int:
    from specplug.cli import CliError, _parse_options
    args = build_parser().parse_args(argv)
    try:
        block = card_block(args.method, args.drafter, _parse_options(args.option), args.budget)
        folder = write_card(args.card, block)
    except (CliError, ValueError, OSError) as e:
        print(f"specplug sglang-card: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {folder}: run it with --speculative-algorithm "
          f"{algorithm_for(args.method, native=False)} --speculative-draft-model-path {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

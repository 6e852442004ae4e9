"""`specplug convert SRC DST --from ... --to ...`: argparse entry; failures are one line, exit != 0."""
from __future__ import annotations

import argparse
import sys

from .sources import SOURCES
from .targets import TARGETS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specplug convert",
                                description="Convert a trained drafter checkpoint into what vLLM, SGLang or specplug load.")
    p.add_argument("src", metavar="SRC", help="source checkpoint folder")
    p.add_argument("dst", metavar="DST", help="output folder (must not exist unless --force)")
    p.add_argument("--from", dest="from_format", default="auto", choices=SOURCES + ("auto",))
    p.add_argument("--to", dest="to_format", required=True, choices=TARGETS)
    p.add_argument("--verifier", metavar="TARGET", help="target model folder: checked against the drafter, "
                   "named in the output config, source of tokenizer/embeddings when the format needs them")
    p.add_argument("--draft-vocab-map", metavar="FILE", help="d2t/t2d file (SpecForge's vocab_mapping.pt)")
    p.add_argument("--validate", action="store_true",
                   help="reload the output and compare the drafter's logits before/after on random inputs")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed its one-line usage error
        return int(e.code or 0)
    from .convert import convert
    try:
        res = convert(args.src, args.dst, args.from_format, args.to_format, verifier=args.verifier,
                      draft_vocab_map=args.draft_vocab_map, validate=args.validate, force=args.force)
    except (ValueError, OSError, AssertionError) as e:
        print(f"specplug convert: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # anything else is still reported on one line, never a traceback
        print(f"specplug convert: error: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return 1
    msg = (f"converted {res.family} ({res.from_format} -> {res.to_format}): {res.num_tensors} tensors, "
           f"{res.num_bytes / 1e6:.1f} MB -> {res.dst}")
    if res.folded_fc_bias:
        msg += "; fc.bias folded into layer 0's q/k/v/o biases (vLLM's EAGLE fc has none)"
    if res.max_abs_logit_diff is not None:
        msg += f"; validated, max |logit diff| {res.max_abs_logit_diff:.3g}"
    print(msg)
    return 0


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())

"""`specplug train ...`: make training data, train drafters, inspect layers, rebuild shipped ones.

  specplug train data     --target T --output DIR [--source self|reference] [--num-prompts N]
  specplug train eagle3   --target T --data DIR --output DIR [--draft-vocab 8192] [--steps N]
  specplug train draft | dflash | diffusion --target T --data DIR --output DIR [...]
  specplug train layer-stats --target T [--data DIR | --suite mtbench] --output DIR
  specplug train evaluate --head DIR --output FILE.json   (MT-Bench turn 1, greedy)
  specplug train rebuild-all [--target T] [--work DIR]   (reproduces specplug/assets/drafters)
Every command resumes when pointed at the same --output again.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# family -> module exposing add_arguments(parser), config_from_args(args, target) -> its Config
# dataclass (fields target, data, output, progress, ...) and train(config) -> output folder
TRAINER_MODULES = {
    "draft": "specplug.training.draft_train",
    "dflash": "specplug.training.dflash_train",
    "diffusion": "specplug.training.diffusion_train",
}
TRAINER_HELP = {
    "draft": "a small draft model distilled from the target's logits",
    "dflash": "a DFlash block-diffusion head on target hidden states",
    "diffusion": "a SpecDiff masked-diffusion drafter distilled from the target",
}


def trainer_module(family: str):
    return importlib.import_module(TRAINER_MODULES[family])

def _target_default() -> str:
    from ..models.prepare import model_dir
    return model_dir("smollm2")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specplug train", description="train drafters")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="prompts answered by the target, with its hidden states")
    d.add_argument("--target", default=None, help="target model folder (default: prepared SmolLM2)")
    d.add_argument("--output", required=True)
    d.add_argument("--source", choices=("self", "reference"), default="self",
                   help="self: the target answers (decoding); reference: the target reads the "
                        "dataset's answers (prefill, ~10x cheaper on CPU)")
    d.add_argument("--num-prompts", type=int, default=512)
    d.add_argument("--batch-size", type=int, default=16)
    d.add_argument("--prompts-per-chunk", type=int, default=16)
    d.add_argument("--max-prompt-tokens", type=int, default=256)
    d.add_argument("--max-new-tokens", type=int, default=192)
    d.add_argument("--max-len", type=int, default=320)
    d.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    d.add_argument("--skip-prompts", type=int, default=0)

    e = sub.add_parser("eagle3", help="EAGLE-3 head with a reduced draft vocabulary")
    e.add_argument("--target", default=None)
    e.add_argument("--data", required=True)
    e.add_argument("--output", required=True)
    e.add_argument("--draft-vocab", type=int, default=8192)
    e.add_argument("--steps", type=int, default=600)
    e.add_argument("--stop-at", type=int, default=None,
                   help="stop at this step; the learning-rate schedule still spans --steps")
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--seq-len", type=int, default=320)
    e.add_argument("--ttt-steps", type=int, default=3)
    e.add_argument("--answer-context", type=int, default=None,
                   help="start each training window this many tokens before the answer")
    e.add_argument("--lr", type=float, default=1e-3)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--save-every", type=int, default=50)
    e.add_argument("--max-minutes", type=float, default=None)
    e.add_argument("--no-bf16", action="store_true", help="train without bfloat16 autocast")

    for family, help_text in TRAINER_HELP.items():
        t = sub.add_parser(family, help=help_text)
        t.add_argument("--target", default=None)
        t.add_argument("--data", required=True, help="data folder(s) from `specplug train data`, comma-separated")
        t.add_argument("--output", required=True)
        trainer_module(family).add_arguments(t)

    s = sub.add_parser("layer-stats", help="per-layer cosine to the final hidden and early-exit CE")
    s.add_argument("--target", default=None)
    s.add_argument("--output", required=True)
    s.add_argument("--suite", default="mtbench", help="prompt suite (when no --data)")
    s.add_argument("--data", default=None, help="a data folder: use its token sequences")
    s.add_argument("--num-prompts", type=int, default=16)
    s.add_argument("--max-len", type=int, default=256)

    v = sub.add_parser("evaluate", help="tau and tokens/s of plain, lookup, the head and hybrid")
    v.add_argument("--target", default=None)
    v.add_argument("--head", required=True, help="trained head folder")
    v.add_argument("--output", required=True, help="JSON file to write")
    v.add_argument("--num-prompts", type=int, default=10)
    v.add_argument("--max-new-tokens", type=int, default=96)
    v.add_argument("--gamma", type=int, default=5)
    v.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    v.add_argument("--methods", default=None, help="comma list (default: all)")

    r = sub.add_parser("rebuild-all", help="rebuild the shipped drafters deterministically")
    r.add_argument("--target", default=None)
    r.add_argument("--work", default=None, help="data/checkpoint folder (default: a cache dir)")
    r.add_argument("--assets", default=None, help="where to write (default: specplug/assets/drafters)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    target = getattr(args, "target", None) or _target_default()
    try:
        if args.command == "data":
            from .data import DataConfig, generate_data
            meta = generate_data(DataConfig(target, args.output, args.num_prompts, args.prompts_per_chunk,
                                            args.batch_size, args.max_prompt_tokens, args.max_new_tokens,
                                            args.dtype, "sharegpt", args.skip_prompts, args.source,
                                            args.max_len))
            print(f"{args.output}: {len(meta['chunks'])} chunks, {meta['num_tokens']} tokens")
        elif args.command == "eagle3":
            from .eagle3_train import Eagle3TrainConfig, train_eagle3
            out = train_eagle3(Eagle3TrainConfig(
                target, args.data, args.output, draft_vocab=args.draft_vocab, steps=args.steps,
                stop_at=args.stop_at,
                batch_size=args.batch_size, seq_len=args.seq_len, ttt_steps=args.ttt_steps,
                answer_context=args.answer_context, lr=args.lr, seed=args.seed,
                bf16_autocast=not args.no_bf16, save_every=args.save_every,
                max_minutes=args.max_minutes))
            print(f"EAGLE-3 head written to {out}")
        elif args.command in TRAINER_MODULES:
            module = trainer_module(args.command)
            out = module.train(module.config_from_args(args, target))
            print(f"{args.command} drafter written to {out}")
        elif args.command == "layer-stats":
            from .layer_stats import run_layer_stats
            path = run_layer_stats(target, args.output, args.suite, args.data, args.num_prompts,
                                   args.max_len)
            print(f"layer stats written to {path}")
        elif args.command == "evaluate":
            from .evaluate import evaluate
            evaluate(target, args.head, args.output, args.num_prompts, args.max_new_tokens,
                     args.gamma, args.dtype,
                     methods=tuple(args.methods.split(",")) if args.methods else None)
            print(f"results written to {args.output}")
        elif args.command == "rebuild-all":
            from .rebuild import rebuild_all
            for path in rebuild_all(target, args.work, args.assets):
                print(f"rebuilt {path}")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""`specplug` command line: generate, bench, convert, train, models, methods, sglang-card."""
from __future__ import annotations

import argparse
import json
import os
import sys


class CliError(Exception):
    pass


def _read_prompts(args) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    path = args.prompts_file
    if not os.path.isfile(path):
        raise CliError(f"prompts file not found: {path}")
    prompts = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    raise CliError(f"{path}:{line_no}: not valid JSON")
                text = rec.get("prompt") or rec.get("text") or (rec.get("turns") or [None])[0]
                if not isinstance(text, str):
                    raise CliError(f"{path}:{line_no}: no 'prompt', 'text' or 'turns' field")
                prompts.append(text)
            else:
                prompts.append(line.replace("\\n", "\n"))
    if not prompts:
        raise CliError(f"prompts file {path} has no prompts")
    return prompts


def _parse_options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise CliError(f"--option wants KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, help="HF causal LM folder")
    p.add_argument("--drafter", help="drafter checkpoint folder, or 'ngram'")
    p.add_argument("--method", default=None,
                   help="none | ngram | draft | eagle | eagle3 | dflash | specdiff | hybrid")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompts-file", help=".txt (one prompt a line) or .jsonl")
    p.add_argument("--gamma", type=int, default=None,
                   help="draft tokens per step (tree depth); default: the method's (suffix 24, "
                        "else 5)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", default="embedded", choices=["embedded", "vllm", "sglang"])
    p.add_argument("--chat-template", action="store_true")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    p.add_argument("--tree-topk", type=int, help="tree drafters: children per node")
    p.add_argument("--tree-depth", type=int, help="tree drafters: depth (default gamma)")
    p.add_argument("--tree-nodes", type=int, help="tree drafters: nodes kept per step")
    p.add_argument("--denoise-steps", type=int, help="specdiff: denoising steps k")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="other drafter options")
    p.add_argument("--budget", action=argparse.BooleanOptionalAction, default=True,
                   help="the automatic speculation budget picks each row's draft length every "
                        "step, 0 allowed (default: on; embedded engine, and vLLM for specplug's "
                        "own drafters); --no-budget drafts gamma every step")
    p.add_argument("--stats-output", help="write the stats JSON here")
    p.add_argument("--quiet", action="store_true", help="print only the summary line")


def config_from_args(args):
    from .api import GenerateConfig
    options = _parse_options(args.option)
    for name in ("tree_topk", "tree_depth", "tree_nodes", "denoise_steps"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    return GenerateConfig(
        target=args.target, prompts=_read_prompts(args), method=args.method, drafter=args.drafter,
        gamma=args.gamma, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
        engine=args.engine, chat_template=args.chat_template, stop=tuple(args.stop),
        dtype=args.dtype, options=options, budget=args.budget)


def cmd_generate(args) -> int:
    from .api import generate, stats_json, write_stats
    if (args.gamma is not None and args.gamma < 1) or args.batch_size < 1 \
            or args.max_new_tokens < 1:
        raise CliError("--gamma, --batch-size and --max-new-tokens must be >= 1")
    if not os.path.exists(args.target):
        raise CliError(f"target path not found: {args.target}")
    cfg = config_from_args(args)
    outputs, stats = generate(cfg)
    if not args.quiet:
        for i, out in enumerate(outputs):
            print(f"--- [{i}] {out.num_new_tokens} tokens, finish={out.finish_reason}")
            print(out.output_text)
    print(stats.summary_line(cfg.method))
    if args.stats_output:
        write_stats(args.stats_output, stats_json(cfg, outputs, stats))
    return 0


def cmd_models(args) -> int:
    from .models.prepare import prepare
    print(prepare(args.name, force=args.force))
    return 0


def cmd_methods(args) -> int:
    from .drafters.base import available_methods
    print("\n".join(["none"] + available_methods()))
    return 0


def _delegate(module: str, argv: list[str]) -> int:
    import importlib
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise CliError(f"this command is not available ({e})")
    return int(mod.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from .tested_versions import warn_if_untested
    warn_if_untested()
    # bench / convert / train own their argument parsing
    delegated = {"bench": "specplug.benchmarks.cli", "convert": "specplug.converters.cli",
                 "train": "specplug.training.cli",
                 "sglang-card": "specplug.integrations.sglang.card_cli"}
    if argv and argv[0] in delegated:
        try:
            return _delegate(delegated[argv[0]], argv[1:])
        except CliError as e:
            print(f"specplug: error: {e}", file=sys.stderr)
            return 2
    parser = argparse.ArgumentParser(prog="specplug")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_args(sub.add_parser("generate", help="generate with or without speculation"))
    m = sub.add_parser("models", help="prepare offline models")
    m.add_argument("action", choices=["prepare"])
    m.add_argument("name")
    m.add_argument("--force", action="store_true")
    sub.add_parser("methods", help="list drafter methods")
    for name in delegated:
        sub.add_parser(name, help=f"see specplug {name} --help")
    args = parser.parse_args(argv)
    handlers = {"generate": cmd_generate, "models": cmd_models, "methods": cmd_methods}
    try:
        return handlers[args.command](args)
    except (CliError, ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        print(f"specplug: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

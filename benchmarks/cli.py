"""`specplug bench ...` and `specplug bench report DIR` (the lead's CLI dispatches here)."""
from __future__ import annotations

import argparse
import os
import sys

from specplug.drafters.base import DrafterSpec

from .engines import ENGINES


def _bench_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="specplug bench",
        description="Benchmark a drafter against the same engine's plain run and transformers' "
                    "generate() anchors on the same prompts, arms alternating block by block, "
                    "repeated (--repeats). "
                    "`specplug bench report DIR` rebuilds the table and plots from saved JSON.")
    p.add_argument("--suite", required=True,
                   help="mtbench, humaneval, sharegpt, or a .txt (one prompt per line) / .jsonl file")
    p.add_argument("--target", required=True, help="target model folder (HF format)")
    p.add_argument("--drafter", default=None,
                   help="drafter checkpoint folder, or 'ngram' (then --method defaults to it)")
    p.add_argument("--method", default=None,
                   help="drafter method (ngram, draft, eagle3, ...; none = baselines only). "
                        "Default: draft when --drafter is a folder, else ngram")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="drafter option, repeatable (e.g. max_ngram=3)")
    p.add_argument("--compare", action="append", default=[], metavar="[LABEL:]METHOD[@PATH][,K=V...]",
                   help="another drafter arm in the same run (embedded, vllm, sglang), "
                        "repeatable, e.g. --compare dflash@assets/smollm2-dflash --compare "
                        "hyb:hybrid@assets/smollm2-eagle3,head_min_confidence=0.4")
    p.add_argument("--engine", default="embedded", choices=ENGINES)
    p.add_argument("--also-engine", action="append", default=[], choices=ENGINES,
                   metavar="ENGINE", help="another engine's arms in the same run, repeatable; "
                   "its plain arm is also reported against --engine's plain arm (e.g. "
                   "--engine vllm --also-engine embedded --method none)")
    p.add_argument("--no-anchors", action="store_true",
                   help="skip the HF generate() arms beside a non-HF engine")
    p.add_argument("--num-prompts", type=int, default=None)
    p.add_argument("--per-category", type=int, default=None, metavar="K",
                   help="keep the first K prompts of every category (before --num-prompts)")
    p.add_argument("--turns", type=int, default=1, choices=(1, 2))
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--gamma", type=int, default=None,
                   help="draft tokens per step, every arm; default: each arm's method's own "
                        "(suffix 24, else 5; SGLang arms 5: it verifies at full width)")
    p.add_argument("--budget", default="off", choices=("on", "off", "both"),
                   help="drafter arms (embedded, or vLLM through the plugin) without the "
                        "automatic speculation budget (gamma every step), with it (label suffix "
                        "/budget), or both")
    p.add_argument("--repeats", type=int, default=3,
                   help="passes over the prompts; speedups are reported as min/median/max")
    p.add_argument("--block", type=int, default=0,
                   help="requests per block: arms take turns every block (default: batch size)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float64"))
    p.add_argument("--no-chat-template", action="store_true",
                   help="feed prompts as raw text even when the tokenizer has a chat template")
    p.add_argument("--output", default="bench_results", help="folder for the JSON and plots")
    p.add_argument("--name", default=None, help="JSON file stem (default from suite/engine/method)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specplug bench report",
                                description="Rebuild the results table and plots from saved JSON.")
    p.add_argument("dir", help="folder holding bench JSON files")
    p.add_argument("--readme", default=None,
                   help="markdown file whose results section is rewritten (default: "
                        "benchmarks/README.md, and the generated blocks of README.md and "
                        "integrations/vllm/README.md too)")
    p.add_argument("--no-plots", action="store_true")
    return p


def _options(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"option {pair!r}: expected KEY=VALUE")
        k, v = pair.split("=", 1)
        out[k] = v
    return out


def parse_compare(text: str) -> tuple[str, DrafterSpec]:
    """'[LABEL:]METHOD[@PATH][,K=V...]' -> (arm label, DrafterSpec)."""
    head, *pairs = text.split(",")
    label, _, rest = head.rpartition(":") if ":" in head.split("@")[0] else ("", "", head)
    method, _, path = rest.partition("@")
    if not method:
        raise ValueError(f"--compare {text!r}: expected [LABEL:]METHOD[@PATH][,K=V...]")
    if path and not os.path.isdir(path):
        raise ValueError(f"--compare {text!r}: drafter path not found: {path}")
    return label or method, DrafterSpec(method, path or None, _options(pairs))


def _method(args) -> tuple[str, str | None]:
    drafter = args.drafter
    if drafter == "ngram":
        return args.method or "ngram", None
    if args.method:
        return args.method, drafter
    return ("draft", drafter) if drafter else ("ngram", None)


def _sweep_parser() -> argparse.ArgumentParser:
    p = _bench_parser()
    p.prog = "specplug bench sweep"
    p.description = ("The same arms at several batch sizes: one bench run per size "
                     "(<stem>_b<batch>.json), then the speedup against batch size.")
    p.add_argument("--batch-sizes", required=True, metavar="B1,B2,...",
                   help="batch sizes to run, e.g. 1,4,10,32 (--batch-size is ignored)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "report":
        return _report_main(argv[1:])
    sweep = bool(argv) and argv[0] == "sweep"
    args = (_sweep_parser() if sweep else _bench_parser()).parse_args(argv[1:] if sweep else argv)
    from specplug.datasets import DatasetError
    from specplug.models.loading import ModelLoadError
    from specplug.jobfile import EngineSessionError
    from .engines import EngineUnavailable
    from .plots import plot_run
    from .report import results_table
    from .runner import BenchConfig, run_bench, write_json
    try:
        method, drafter = _method(args)
        if drafter and not os.path.isdir(drafter):
            raise ValueError(f"drafter path not found: {drafter}")
        compare = [parse_compare(c) for c in args.compare]
        cfg = BenchConfig(
            compare=compare, suite=args.suite, target=args.target, method=method, drafter=drafter,
            options=_options(args.option), engine=args.engine, anchors=not args.no_anchors,
            also_engines=list(args.also_engine),
            num_prompts=args.num_prompts, per_category=args.per_category, turns=args.turns, max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size, gamma=args.gamma, temperature=args.temperature,
            chat_template=not args.no_chat_template, seed=args.seed, dtype=args.dtype,
            output=args.output, name=args.name, budget=args.budget, repeats=args.repeats,
            block=args.block)
        configs = [cfg]
        if sweep:
            from .batch_sweep import parse_batch_sizes, sweep_configs
            configs = sweep_configs(cfg, parse_batch_sizes(args.batch_sizes))
        results = []
        for one in configs:  # each run's JSON is written as soon as it is done
            results.append(run_bench(one, progress=not args.no_progress))
            path = write_json(results[-1], one.output)
            plots = plot_run(results[-1], os.path.join(one.output, "plots"))
            print(results_table([results[-1]]))
            print(f"wrote {path} and {len(plots)} plots under {os.path.join(one.output, 'plots')}")
    except (DatasetError, ModelLoadError, EngineUnavailable, ValueError, OSError) as e:
        print(f"specplug bench: error: {e}", file=sys.stderr)
        return 2
    except EngineSessionError as e:  # the engine's own failure: its line and where its log is
        print(f"specplug bench: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    if sweep:
        from .batch_sweep import plot_sweeps, sweep_table
        print(sweep_table(results))
        plot_sweeps(results, os.path.join(cfg.output, "plots"))
    return 0


def _report_main(argv: list[str]) -> int:
    args = _report_parser().parse_args(argv)
    from .report import DEFAULT_README, DOC_BLOCKS, ReportError, report
    try:
        # an explicit --readme writes that file alone; the default rebuilds the repo's docs
        out = report(args.dir, args.readme or DEFAULT_README, plots=not args.no_plots,
                     docs=None if args.readme else DOC_BLOCKS)
    except (ReportError, OSError, KeyError) as e:
        msg = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        print(f"specplug bench report: error: {msg}", file=sys.stderr)
        return 2
    print(out["table"])
    print(f"{len(out['runs'])} runs, {len(out['plots'])} plots; table written to "
          f"{args.readme or DEFAULT_README}" + "".join(f", {d}" for d in out["docs"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""vLLM in multiprocess mode (engine core and worker in their own processes) with a specplug
drafter: prints this process's pid and a JSON result line; the plugin logs from every process.

usage: python multiprocess_plugin.py TARGET NUM_DRAFT_TOKENS
"""
import json
import os
import sys


def main(target: str, gamma: int) -> None:
    from specplug.engine.rows import Request
    from specplug.integrations.vllm.generate import run_vllm_requests, speculative_settings
    spec, extra = speculative_settings("ngram", None, {"max_ngram": 3}, gamma)
    reqs = [Request([5, 6, 7, 8, 5, 6, 7], 24), Request([40, 41, 42, 40, 41], 24)]
    # "mp" runs the worker in its own process even at tensor_parallel_size 1
    outputs, stats = run_vllm_requests(target, reqs, spec, extra, ignore_eos=True,
                                       llm_kwargs={"distributed_executor_backend": "mp",
                                                   "kv_cache_memory_bytes": 64 << 20})
    print("RESULT " + json.dumps({"main_pid": os.getpid(), "summary": stats.summary(),
                                  "outputs": [o.output_token_ids for o in outputs]}), flush=True)


if __name__ == "__main__":  # multiprocess vLLM spawns children that re-import this file
    main(sys.argv[1], int(sys.argv[2]))

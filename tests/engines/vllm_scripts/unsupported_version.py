"""vLLM whose version the plugin does not support (simulated by patching the version it reads):
vLLM must still start and serve, and the plugin must log why it registered nothing.

usage: python unsupported_version.py TARGET FAKE_VERSION PROMPTS_JSON MAX_NEW_TOKENS
(prints one JSON result line)
"""
import json
import sys


def main(target: str, fake_version: str, prompts: list[list[int]], max_new: int) -> None:
    import vllm
    vllm.__version__ = fake_version  # what specplug.integrations.vllm.compat reads
    from specplug.engine.rows import Request
    from specplug.integrations.vllm import plugin
    from specplug.integrations.vllm.generate import run_vllm_requests
    reqs = [Request(p, max_new) for p in prompts]
    outputs, _ = run_vllm_requests(target, reqs, ignore_eos=True,
                                   llm_kwargs={"kv_cache_memory_bytes": 64 << 20})
    print("RESULT " + json.dumps({"registered": plugin._registered,
                                  "outputs": [o.output_token_ids for o in outputs]}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]))

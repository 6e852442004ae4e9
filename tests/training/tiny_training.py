"""A tiny target and a tiny data folder recorded through the engine, shared by the trainer tests."""
import torch

from specplug.models.tiny import build_tiny_llama, build_tiny_tokenizer, save_model
from specplug.training.data import DataConfig, generate_data

LAYERS = 4


def tiny_target(layers: int = LAYERS, sharpness: float | None = 3.0):
    """The float64 tiny Llama the trainer tests distil."""
    kw = {} if sharpness is None else {"sharpness": sharpness}
    return build_tiny_llama(seed=0, layers=layers, **kw)


def save_tiny_target(folder: str, layers: int = LAYERS, sharpness: float | None = 3.0) -> str:
    return save_model(tiny_target(layers, sharpness), build_tiny_tokenizer(), folder)


def random_prompts(count: int = 12, token_high: int = 256) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1, token_high, (int(n),), generator=g).tolist()
            for n in torch.randint(4, 12, (count,), generator=g)]


def record_data(target_dir: str, folder: str, prompts: list[list[int]], per_chunk: int,
                max_new_tokens: int = 24) -> str:
    generate_data(DataConfig(target_dir, folder, prompts_per_chunk=per_chunk, batch_size=per_chunk,
                             max_new_tokens=max_new_tokens, dtype="float32", prompt_ids=prompts),
                  progress=False)
    return folder

"""Tiny deterministic models and a tokenizer built locally, so tests need no download.

`build_tiny_llama(seed)` gives a small Llama with sharp (low-entropy) next-token distributions:
random init with a scaled-up lm_head, so greedy decoding has few near-ties.  Drafters for it are
built from the same weights (equal -> every draft accepted) or perturbed copies (imperfect).
"""
from __future__ import annotations

import os

import torch

TINY_CORPUS = (
    "the cat sat on the mat. the dog sat on the log. a bird flew over the tree and the cat "
    "watched the bird. def add(a, b): return a + b. def mul(a, b): return a * b. "
    "one two three four five six seven eight nine ten. hello world, hello specplug. "
) * 4


def build_tiny_tokenizer(vocab_size: int = 256):
    """A byte-level BPE trained on a fixed corpus: deterministic, offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([TINY_CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def tiny_llama_config(vocab_size: int = 256, hidden: int = 64, layers: int = 2, heads: int = 4,
                      kv_heads: int = 2, max_pos: int = 512, **extra):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, max_position_embeddings=max_pos,
                       tie_word_embeddings=False, bos_token_id=None, eos_token_id=0,
                       pad_token_id=0, **extra)


def build_tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float64, sharpness: float = 8.0,
                     **config_kw):
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**config_kw))
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpness)
    model.generation_config.eos_token_id = None  # tiny tests run to max_new_tokens
    return model.to(dtype).eval()


def perturbed_copy(model, noise: float, seed: int = 1):
    """Same architecture, weights + noise: a drafter that agrees with the target often, not always."""
    import copy
    torch.manual_seed(seed)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * noise * p.std().clamp(min=1e-3))
    return other.eval()


def save_model(model, tokenizer, path: str) -> str:
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path

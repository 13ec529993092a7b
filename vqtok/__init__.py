"""vqtok: the VQ image tokenizer (VQGAN-style conv encoder/decoder + vector-quantize-pytorch codebook).

Public API:
    VQConfig, preset, load_config        typed configs and the named presets (chameleon, small, tiny)
    VQModel                              encode(images) -> indices, decode(indices) -> images
    load_tokenizer(path)                 a trained tokenizer from a run or checkpoint directory
    nearest_code(vectors, codebook)      the single nearest-code search used by encode
    TokenStore                           read what `vqtok encode` wrote (memory-mapped shards + manifest)
"""
from .checkpoint import load_tokenizer
from .config import VQConfig, load_config, preset
from .lookup import nearest_code
from .model import VQModel
from .token_store import TokenRecord, TokenStore

__all__ = ["VQConfig", "VQModel", "TokenRecord", "TokenStore", "load_config", "load_tokenizer", "nearest_code", "preset"]

"""Tiny random Chameleon checkpoints in transformers' format, built offline: what the interop tests check our
model against, and what scripts/bench_chameleon.py times. transformers is a test-time peer (the `test` and
`chameleon` extras): importing this module needs it."""
from __future__ import annotations

import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from unified_lm.interop.chameleon import image_token_name  # noqa: E402
from vqtok.compat import import_torchvision  # noqa: E402

import_torchvision()  # transformers' image utilities import torchvision (CUDA build on a CPU torch)

from transformers import ChameleonConfig, ChameleonForConditionalGeneration  # noqa: E402

WORDS = ("the red circle sits left of a blue square while green triangles float above quiet water and "
         "small yellow stars shine over seven tall trees near the old stone bridge").split()


def text_corpus(count: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) for _ in range(count)]


def build_tokenizer_json(path: Path, codebook_size: int, text_vocab: int = 300, seed: int = 0) -> dict[str, int]:
    """A byte-level BPE tokenizer.json laid out like Chameleon's: <s> <pad> </s> <unk>, then the image tokens
    in a SHUFFLED code order (so no offset maps codes to ids), <eoss> <racm3:break> <image>, two reserved
    tokens, then the BPE pieces. Returns the token -> id map."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    codes = list(range(codebook_size))
    random.Random(seed).shuffle(codes)
    specials = (["<s>", "<pad>", "</s>", "<unk>"] + [image_token_name(c) for c in codes]
                + ["<eoss>", "<racm3:break>", "<image>", "<reserved08706>", "<reserved08707>"])
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=len(specials) + text_vocab, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(text_corpus(seed=seed), trainer)
    tokenizer.save(str(path))
    return tokenizer.get_vocab(with_added_tokens=True)


def tiny_vq_config(codebook_size: int = 32) -> dict:
    # 32x32 pictures -> 8x8 codes (two downsamplings); widths multiples of 32 (transformers' GroupNorm(32))
    return {"embed_dim": 16, "num_embeddings": codebook_size, "latent_channels": 16, "resolution": 32,
            "base_channels": 32, "channel_multiplier": [1, 1, 2], "num_res_blocks": 1}


def build_hf_checkpoint(directory: Path, codebook_size: int = 32, swin_norm: bool = False, seed: int = 0,
                        layers: int = 2, dim: int = 64, heads: int = 4, kv_heads: int = 2,
                        tie_word_embeddings: bool = False, text_vocab: int = 300,
                        max_positions: int = 256) -> ChameleonForConditionalGeneration:
    """Save a random ChameleonForConditionalGeneration (every weight random, QK-norm weights and biases
    included) with its tokenizer.json into `directory`; returns the model in eval mode (fp32)."""
    directory.mkdir(parents=True, exist_ok=True)
    vocabulary_map = build_tokenizer_json(directory / "tokenizer.json", codebook_size, text_vocab, seed=seed)
    config = ChameleonConfig(
        vocab_size=len(vocabulary_map), hidden_size=dim, intermediate_size=2 * dim + 32, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
        vocabulary_map=vocabulary_map, vq_config=tiny_vq_config(codebook_size), swin_norm=swin_norm,
        bos_token_id=0, pad_token_id=1, eos_token_id=2, tie_word_embeddings=tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})
    torch.manual_seed(seed)
    model = ChameleonForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                parameter.copy_(1.0 + 0.2 * torch.randn_like(parameter))
            elif "norm" in name:
                parameter.normal_(0.0, 0.2)
            elif ".vqmodel." in name:
                parameter.normal_(0.0, 0.15)
            else:
                parameter.normal_(0.0, 0.08)
    model.save_pretrained(directory)
    return model

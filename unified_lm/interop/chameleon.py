"""Chameleon interop: transformers' ChameleonForConditionalGeneration checkpoints <-> unified_lm checkpoints.

    unified-lm import-chameleon HF_DIR OUT [--meta-vqgan vqgan.ckpt]   # HF -> OUT (a unified_lm checkpoint)
    unified-lm export-chameleon RUN OUT [--tokenizer VQRUN]            # unified_lm -> OUT (transformers loads it)

The two models are the same network (Llama block + Chameleon's per-head QK LayerNorm with bias, norm
reordering as `swin_norm`); the converter renames tensors one to one and checks every name and shape:

    model.embed_tokens                      embed
    model.layers.i.self_attn.{q,k,v,o}_proj layers.i.attention.{q,k,v,o}_proj
    model.layers.i.self_attn.{q,k}_norm     layers.i.attention.{q,k}_norm      (n_heads, head_dim) weight and bias
    model.layers.i.mlp.{gate,up,down}_proj  layers.i.feed_forward.{w1,w3,w2}
    model.layers.i.input_layernorm          layers.i.attention_norm
    model.layers.i.post_attention_layernorm layers.i.ffn_norm
    model.norm, lm_head                     norm, lm_head
    model.vqmodel.*                         the image tokenizer (vqtok.chameleon), written to OUT/tokenizer

The vocabulary keeps the checkpoint's own ids (`Vocabulary.converted`): text comes from the checkpoint's
`tokenizer.json` (or the `text.model` an export wrote), the image-code -> id table from `config.vocabulary_map`
(image tokens are named "IMGIMG" + the code's digits spelled A-J + "Z"), <boi>/<eoi> are `<racm3:break>` and
`<eoss>` (or the tokenizer_config's boi_token/eoi_token), <image> is `<image>`. No offset is assumed, so
Anole-style weights that draw keep drawing. transformers masks image logits in its forward (it cannot
generate pictures); this codebase does not.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from runkit.checkpoints import check_weight_shapes
from runkit.files import atomic_write_text, confined, load_tensors, read_json
from unified_lm.model.config import ModelConfig, TrainConfig, UnifiedConfig
from unified_lm.model.transformer import UnifiedTransformer
from unified_lm.tokens.vocab import SPECIAL_TOKENS, TEXT_MODEL_FILE, TOKENIZER_JSON_FILE, Vocabulary
from vqtok import chameleon as vq_chameleon
from vqtok.checkpoint import read_checkpoint

IMAGE_NAME_PREFIX = "IMGIMG"
# our special -> the token name Chameleon's tokenizer gives it
CHAMELEON_NAMES = {"<bos>": "<s>", "<eos>": "</s>", "<pad>": "<pad>", "<boi>": "<racm3:break>",
                   "<eoi>": "<eoss>", "<image>": "<image>"}
QK_NORM_EPS = 1e-5  # transformers' ChameleonLayerNorm hard-codes it


def image_token_name(code: int) -> str:
    """1234 -> "IMGIMGBCDEZ" (Chameleon's names for image-code tokens)."""
    return IMAGE_NAME_PREFIX + "".join(chr(ord("A") + int(d)) for d in str(int(code))) + "Z"


def code_of_name(name: str) -> int:
    digits = name[len(IMAGE_NAME_PREFIX):-1]
    if not digits or not name.endswith("Z") or any(not "A" <= c <= "J" for c in digits):
        raise ValueError(f"{name!r} is not an image-code token name (IMGIMG + letters A-J + Z)")
    return int("".join(str(ord(c) - ord("A")) for c in digits))


# -- configs ------------------------------------------------------------------------------------------------------
def model_config_from_hf(info: dict, where: str = "config.json") -> ModelConfig:
    """transformers' ChameleonConfig (a dict) -> ModelConfig; what this model cannot represent is refused."""
    problems = []
    if info.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={info['hidden_act']!r} (SwiGLU with silu only)")
    for field in ("attention_bias", "mlp_bias"):
        if info.get(field):
            problems.append(f"{field}=true (the model has no biases)")
    rope = info.get("rope_parameters") or info.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        problems.append(f"rope type {rope_type!r} (plain RoPE only)")
    if problems:
        raise ValueError(f"{where}: cannot convert: " + "; ".join(problems))
    try:
        heads = int(info["num_attention_heads"])
        config = ModelConfig(
            vocab_size=int(info["vocab_size"]), dim=int(info["hidden_size"]), n_layers=int(info["num_hidden_layers"]),
            n_heads=heads, n_kv_heads=int(info.get("num_key_value_heads") or heads),
            ffn_hidden=int(info["intermediate_size"]), max_seq_len=int(info.get("max_position_embeddings", 4096)),
            rope_theta=float(rope.get("rope_theta", info.get("rope_theta", 10_000.0))),
            norm_eps=float(info.get("rms_norm_eps", 1e-5)), qk_norm=True, qk_norm_eps=QK_NORM_EPS,
            norm_reordering=bool(info.get("swin_norm", False)), dropout=float(info.get("attention_dropout") or 0.0),
            tied_embeddings=bool(info.get("tie_word_embeddings", False)))
    except KeyError as err:
        raise ValueError(f"{where}: missing field {err.args[0]!r}") from None
    UnifiedConfig(model=config, train=TrainConfig(seq_len=min(512, config.max_seq_len))).validate()
    return config


def check_exportable(model: ModelConfig) -> None:
    """Refuse, naming the field, what transformers' Chameleon cannot represent."""
    problems = []
    if not model.qk_norm:
        problems.append("model.qk_norm is false (transformers' Chameleon always normalises q and k)")
    elif (model.qk_norm_eps or model.norm_eps) != QK_NORM_EPS:
        problems.append(f"the QK-norm eps is {model.qk_norm_eps or model.norm_eps} (transformers fixes it at 1e-5)")
    if model.picture.encoder:
        problems.append("the model has a continuous picture path (encoder + adapter), which Chameleon has no place for")
    if model.image_positions:
        problems.append(f"model.image_positions is {model.image_positions} (Chameleon has no image position embeddings)")
    if problems:
        raise ValueError("cannot export to transformers' Chameleon: " + "; ".join(problems))


def hf_config(model: ModelConfig, vocab: Vocabulary, vq_config: dict, dtype: torch.dtype) -> dict:
    """The transformers config.json for `model` (see check_exportable)."""
    special = vocab.special
    vocabulary_map = vocabulary_map_of(vocab)
    return {
        "architectures": ["ChameleonForConditionalGeneration"], "model_type": "chameleon",
        "vocab_size": model.vocab_size, "hidden_size": model.dim, "intermediate_size": model.hidden_dim,
        "num_hidden_layers": model.n_layers, "num_attention_heads": model.n_heads,
        "num_key_value_heads": model.n_kv_heads, "hidden_act": "silu", "max_position_embeddings": model.max_seq_len,
        "rms_norm_eps": model.norm_eps, "rope_parameters": {"rope_type": "default", "rope_theta": model.rope_theta},
        "attention_bias": False, "mlp_bias": False, "attention_dropout": model.dropout,
        "swin_norm": model.norm_reordering, "tie_word_embeddings": model.tied_embeddings, "model_parallel_size": 1,
        "bos_token_id": special.bos, "eos_token_id": special.eos, "pad_token_id": special.pad,
        "image_token_id": special.image, "vocabulary_map": vocabulary_map, "vq_config": vq_config,
        "dtype": str(dtype).removeprefix("torch."), "use_cache": True, "initializer_range": model.init_std,
    }


# -- weights ------------------------------------------------------------------------------------------------------
def name_pairs(config: ModelConfig) -> list[tuple[str, str]]:
    """(transformers name, unified_lm name) for every language-model tensor."""
    pairs = [("model.embed_tokens.weight", "embed.weight"), ("model.norm.weight", "norm.weight")]
    if not config.tied_embeddings:
        pairs.append(("lm_head.weight", "lm_head.weight"))
    renames = [("self_attn.q_proj", "attention.q_proj"), ("self_attn.k_proj", "attention.k_proj"),
               ("self_attn.v_proj", "attention.v_proj"), ("self_attn.o_proj", "attention.o_proj"),
               ("mlp.gate_proj", "feed_forward.w1"), ("mlp.up_proj", "feed_forward.w3"),
               ("mlp.down_proj", "feed_forward.w2"), ("input_layernorm", "attention_norm"),
               ("post_attention_layernorm", "ffn_norm")]
    for layer in range(config.n_layers):
        for theirs, ours in renames:
            pairs.append((f"model.layers.{layer}.{theirs}.weight", f"layers.{layer}.{ours}.weight"))
        for norm in ("q_norm", "k_norm"):
            for p in ("weight", "bias"):
                pairs.append((f"model.layers.{layer}.self_attn.{norm}.{p}", f"layers.{layer}.attention.{norm}.{p}"))
    return pairs


def expected_shapes_state(config: ModelConfig) -> dict[str, torch.Tensor]:
    """The model's state dict on the meta device: names and shapes, nothing allocated (a 7B model included)."""
    with torch.device("meta"):
        return UnifiedTransformer(config).state_dict()


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in expected_shapes_state(config).items()}


def state_from_hf(hf_state: dict[str, torch.Tensor], config: ModelConfig, where: str) -> dict[str, torch.Tensor]:
    """transformers tensors (VQ weights removed) -> unified_lm's; missing, unexpected or misshapen tensors raise."""
    pairs = name_pairs(config)
    known = {theirs for theirs, _ in pairs}
    if config.tied_embeddings:
        known.add("lm_head.weight")  # some exports keep the tied copy; it is the embedding
    missing = [theirs for theirs, _ in pairs if theirs not in hf_state]
    unexpected = sorted(set(hf_state) - known)
    if missing or unexpected:
        raise ValueError(f"{where}: tensors do not match the config (missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]})")
    shapes = expected_shapes(config)
    state = {}
    for theirs, ours in pairs:
        tensor = hf_state[theirs]
        if tuple(tensor.shape) != shapes[ours]:
            raise ValueError(f"{where}: tensor {theirs} has shape {tuple(tensor.shape)}, config.json implies "
                             f"{shapes[ours]}")
        state[ours] = tensor
    return state


def state_to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    return {theirs: state[ours] for theirs, ours in name_pairs(config)}


# -- vocabulary ---------------------------------------------------------------------------------------------------
def _special_names(directory: Path) -> dict[str, str]:
    """Our specials -> token names, with tokenizer_config.json's boi_token / eoi_token / image_token if given."""
    names = dict(CHAMELEON_NAMES)
    config = directory / "tokenizer_config.json"
    if config.is_file():
        info = json.loads(config.read_text())
        for ours, key in (("<boi>", "boi_token"), ("<eoi>", "eoi_token"), ("<image>", "image_token")):
            value = info.get(key)
            names[ours] = value.get("content", names[ours]) if isinstance(value, dict) else (value or names[ours])
    return names


def vocabulary_from_hf(directory: Path, info: dict, codebook_size: int, tokenizer: dict) -> Vocabulary:
    """The checkpoint's own ids: text model, image-code table, specials (see the module docstring)."""
    where = directory / "config.json"
    json_file, spm_file = directory / TOKENIZER_JSON_FILE, directory / TEXT_MODEL_FILE
    if json_file.is_file():
        from tokenizers import Tokenizer

        data, kind = json_file.read_bytes(), "tokenizers"
        hf_tokenizer = Tokenizer.from_str(data.decode("utf-8"))
        names = hf_tokenizer.get_vocab(with_added_tokens=True)
        text_count = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        special_added = {i for i, t in hf_tokenizer.get_added_tokens_decoder().items() if t.special}
    elif spm_file.is_file():
        import sentencepiece as spm

        data, kind = spm_file.read_bytes(), "sentencepiece"
        processor = spm.SentencePieceProcessor(model_proto=data)
        text_count = processor.get_piece_size()
        names, special_added = {}, set()
    else:
        raise FileNotFoundError(f"{directory}: no {TOKENIZER_JSON_FILE} (or {TEXT_MODEL_FILE}); the text tokenizer "
                                "must sit beside config.json, as in the checkpoint's repository")
    vocabulary_map = info.get("vocabulary_map") or names
    size = int(info["vocab_size"])
    for name, token in names.items():
        if name in vocabulary_map and vocabulary_map[name] != token:
            raise ValueError(f"{where}: vocabulary_map gives {name!r} id {vocabulary_map[name]}, "
                             f"{json_file.name} gives {token}")
    bad = [name for name, token in vocabulary_map.items() if not 0 <= int(token) < size]
    if bad:
        raise ValueError(f"{where}: vocabulary_map ids outside [0, vocab_size={size}): {bad[:5]}")
    image_ids = np.full(codebook_size, -1, dtype=np.int64)
    for name, token in vocabulary_map.items():
        if name.startswith(IMAGE_NAME_PREFIX):
            code = code_of_name(name)
            if code >= codebook_size:
                raise ValueError(f"{where}: image token {name!r} is code {code}, the codebook holds {codebook_size}")
            image_ids[code] = int(token)
    if (image_ids < 0).any():
        raise ValueError(f"{where}: vocabulary_map names {(image_ids >= 0).sum()} image tokens, the VQ codebook "
                         f"holds {codebook_size} codes (first missing: code {int(np.argmin(image_ids >= 0))})")
    special_names = _special_names(directory)
    special = {}
    for ours, key in (("<bos>", "bos_token_id"), ("<eos>", "eos_token_id"), ("<pad>", "pad_token_id")):
        value = info.get(key)
        special[ours] = int(value[0] if isinstance(value, list) else value) if value is not None else None
    for ours in SPECIAL_TOKENS:
        if special.get(ours) is None:
            if special_names[ours] not in vocabulary_map:
                raise ValueError(f"{where}: no id for {ours} (token {special_names[ours]!r} is not in the "
                                 "vocabulary_map)")
            special[ours] = int(vocabulary_map[special_names[ours]])
    taken = set(image_ids.tolist()) | set(special.values()) | special_added
    text_ids = [i for i in range(min(text_count, size)) if i not in taken]
    converted = Vocabulary.converted(data, kind, size, special, image_ids, text_ids, tokenizer)
    if kind == "sentencepiece":  # an export of a native vocabulary: give back the native one (same fingerprint)
        native = Vocabulary(data, codebook_size, tokenizer)
        if native.size == size and native.special == converted.special and (native.image_token_ids == image_ids).all():
            return native
    return converted


def vocabulary_map_of(vocab: Vocabulary) -> dict[str, int]:
    """token name -> id for transformers' config: text pieces, Chameleon's names for the specials, IMGIMG names."""
    names = vocab.text.piece_ids()
    for ours in SPECIAL_TOKENS:
        token = getattr(vocab.special, ours.strip("<>"))
        name = CHAMELEON_NAMES[ours]
        if names.get(name, token) != token:
            raise ValueError(f"cannot name {ours} {name!r}: the text model already uses that name for id {names[name]}")
        names[name] = token
    for code, token in enumerate(vocab.image_token_ids.tolist()):
        name = image_token_name(code)
        if names.get(name, token) != token:
            raise ValueError(f"image code {code}'s name {name!r} belongs to id {names[name]} in the text model")
        names[name] = token
    ids = list(names.values())
    if len(set(ids)) != len(ids):
        clash = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"two token names share id {clash}; the vocabulary cannot be written as a vocabulary_map")
    return names


# -- the commands -------------------------------------------------------------------------------------------------
def import_chameleon(source: str | os.PathLike, out: str | os.PathLike, meta_vqgan: str | os.PathLike | None = None,
                     dtype: torch.dtype | None = None) -> Path:
    """transformers checkpoint directory -> OUT: a unified_lm checkpoint directory (model.safetensors,
    config.json, meta.json, vocab/) and OUT/tokenizer, the vqtok tokenizer (encode-only unless `meta_vqgan`
    gives Meta's VQGAN with its decoder). `dtype`: cast the weights (default: keep the checkpoint's)."""
    from unified_lm.model.checkpoint import write_model_files

    source, out = Path(source), Path(out)
    config_path = source / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{source}: missing config.json (give a transformers Chameleon checkpoint directory)")
    info = read_json(config_path)
    if info.get("model_type") != "chameleon":
        raise ValueError(f"{config_path}: model_type is {info.get('model_type')!r}, not 'chameleon'")
    model_config = model_config_from_hf(info, str(config_path))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer_dir = vq_chameleon.convert(tmp / "tokenizer", hf=source, meta=meta_vqgan)
    _, vq_config, vq_meta = read_checkpoint(tokenizer_dir)
    hf_state = vq_chameleon.read_safetensors_dir(source, exclude=vq_chameleon.HF_PREFIX)
    state = state_from_hf(hf_state, model_config, str(source))
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    vocab = vocabulary_from_hf(source, info, vq_config.quantizer.codebook_size, vq_meta["tokenizer"])
    if vocab.size != model_config.vocab_size:
        raise ValueError(f"{config_path}: vocab_size {model_config.vocab_size} but the vocabulary holds {vocab.size}")
    grid = vq_config.model.grid_size
    config = UnifiedConfig(name="chameleon-import", model=model_config,
                           train=TrainConfig(seq_len=min(4096, model_config.max_seq_len))).validate()
    meta = {"step": 0, "converted_from": str(source), "tokenizer_path": "tokenizer",
            "image_grids": {f"{grid}x{grid}": 1}, "dtype": str(next(iter(state.values())).dtype)}
    write_model_files(tmp, state, config, vocab, meta)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def export_chameleon(run: str | os.PathLike, out: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                     dtype: torch.dtype | None = None) -> Path:
    """A unified_lm run or checkpoint -> OUT, a directory `ChameleonForConditionalGeneration.from_pretrained`
    loads: config.json (with vocabulary_map and vq_config), model.safetensors (language model + the VQ encoder
    and codebook of `tokenizer` under model.vqmodel.) and the text model (tokenizer.json or text.model)."""
    from safetensors.torch import save_file

    from unified_lm.model.checkpoint import read_config, resolve_run

    directory = resolve_run(run)
    config = read_config(directory)
    check_exportable(config.model)
    vocab = Vocabulary.load(directory / "vocab")
    meta = read_json(directory / "meta.json") if (directory / "meta.json").is_file() else {}
    if tokenizer is None and meta.get("tokenizer_path"):  # an imported checkpoint carries its tokenizer
        carried = confined(directory, meta["tokenizer_path"], f"{directory / 'meta.json'} tokenizer_path")
        tokenizer = carried if carried.exists() else None
    file = directory / "model.safetensors"
    check_weight_shapes(expected_shapes_state(config.model), file)
    state = load_tensors(file)
    tensors = state_to_hf(state, config.model)
    if tokenizer is not None:
        from vqtok.checkpoint import load_tokenizer

        vq_model, vq_meta = load_tokenizer(tokenizer)
        vocab.check_tokenizer(vq_meta["tokenizer"], f"tokenizer {tokenizer}")
        vq_config = vq_chameleon.config_to_hf(vq_model.config)
        vq_state = vq_chameleon.from_vqtok(vq_model.state_dict(), vq_model.config)
        tensors.update({vq_chameleon.HF_PREFIX + name: tensor for name, tensor in vq_state.items()
                        if not name.startswith("decoder.")})  # transformers' VQ has no decoder
    else:  # no tokenizer: a VQ config of the right codebook size; transformers initialises its weights randomly
        vq_config = {"num_embeddings": vocab.codebook_size, "model_type": "chameleon_vqgan"}
    dtype = dtype or state["embed.weight"].dtype
    info = hf_config(config.model, vocab, vq_config, dtype)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().to(dtype if v.is_floating_point() else v.dtype).contiguous() for k, v in tensors.items()},
              tmp / "model.safetensors", metadata={"format": "pt"})
    atomic_write_text(tmp / "config.json", json.dumps(info, indent=2) + "\n")
    (tmp / vocab.text.file_name).write_bytes(vocab.text.data)
    names = {"boi_token": CHAMELEON_NAMES["<boi>"], "eoi_token": CHAMELEON_NAMES["<eoi>"],
             "image_token": CHAMELEON_NAMES["<image>"]}
    atomic_write_text(tmp / "tokenizer_config.json", json.dumps(names, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out

"""Chameleon's image tokenizer <-> vqtok: transformers' ChameleonVQVAE and Meta's original VQGAN checkpoint.

Both are the Make-A-Scene VQGAN that vqtok's model already implements (taming-transformers layout); only the
names differ, plus three details handled here:
- the attention block's separate q/k/v 1x1 convs are one `qkv` conv in vqtok (concatenated along outputs);
- taming's nested `down[level].block[i]` / `up[level].block[i]` lists are vqtok's flat `nn.Sequential`s;
- the codebook is vector-quantize-pytorch's `_codebook.embed` (1, K, D) buffer, marked initialised.

Sources:
- transformers (`config.json` + `*.safetensors` of a ChameleonForConditionalGeneration, VQ weights under
  `model.vqmodel.`; or a bare ChameleonVQVAE): encoder + quantizer only, so the result is encode-only
  (`model.has_decoder=False`) unless a Meta checkpoint supplies the decoder;
- Meta's release (`vqgan.ckpt`, a Lightning checkpoint read with `torch.load(weights_only=True)`, or the same
  weights as safetensors): encoder + quantizer + decoder; the shape is read off the weights.

Every tensor is checked by name and shape; a mismatch raises an error naming the tensor. Preprocessing is set
to Chameleon's (shorter side to `resolution` with Lanczos, centre crop, alpha on white, [-1, 1]).
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from runkit.files import confined, load_tensors, read_json, tensor_shapes

from .config import ModelConfig, QuantizerConfig, VQConfig

HF_PREFIX = "model.vqmodel."
CODEBOOK = "quantizer.vq._codebook."
# What a Meta VQGAN training checkpoint holds besides the tokenizer: the GAN loss (discriminator, LPIPS).
META_IGNORED_PREFIXES = ("loss.",)


# -- configs ------------------------------------------------------------------------------------------------------
def _frozen_quantizer(codebook_size: int, embed_dim: int) -> QuantizerConfig:
    """A plain nearest-neighbour codebook that fine-tuning will not re-initialise (no k-means, no revival)."""
    return QuantizerConfig(codebook_size=codebook_size, embed_dim=embed_dim, codebook_dim=None, l2_normalized=False,
                           ema=False, kmeans_init=False, dead_code_threshold=0.0, commitment_weight=0.25)


def config_from_hf(vq_config: dict, has_decoder: bool = False, where: str = "vq_config") -> VQConfig:
    """transformers' ChameleonVQVAEConfig (as a dict) -> a vqtok config (the `chameleon` preset's shape)."""
    def get(key, default):
        return vq_config.get(key, default)

    if get("double_latent", False):
        raise ValueError(f"{where}.double_latent is true: Chameleon's quantizer takes latent_channels, not twice that")
    if get("attn_resolutions", None):
        raise ValueError(f"{where}.attn_resolutions={vq_config['attn_resolutions']}: vqtok has attention only in the "
                         "middle of the encoder (Chameleon's tokenizer has none elsewhere)")
    multipliers = tuple(int(m) for m in get("channel_multiplier", (1, 1, 2, 2, 4)))
    base = int(get("base_channels", 128))
    if any(base * m % 32 for m in multipliers):
        raise ValueError(f"{where}: base_channels {base} x channel_multiplier {list(multipliers)} must be multiples "
                         "of 32 (the VQGAN's GroupNorm has 32 groups)")
    model = ModelConfig(resolution=int(get("resolution", 512)), in_channels=int(get("in_channels", 3)),
                        base_channels=base, channel_multipliers=multipliers,
                        num_res_blocks=int(get("num_res_blocks", 2)), z_channels=int(get("latent_channels", 256)),
                        attention_at_lowest=get("attn_type", "vanilla") == "vanilla",
                        dropout=float(get("dropout", 0.0)), num_groups=32, has_decoder=has_decoder,
                        resample="lanczos")
    quantizer = _frozen_quantizer(int(get("num_embeddings", 8192)), int(get("embed_dim", 256)))
    return VQConfig(name="chameleon-converted", model=model, quantizer=quantizer).validate()


def config_to_hf(config: VQConfig) -> dict:
    """A vqtok config -> transformers' vq_config dict (refused where transformers' VQ cannot hold it)."""
    model, quant = config.model, config.quantizer
    widths = [model.base_channels * m for m in model.channel_multipliers]
    problems = []
    if any(width % 32 for width in widths) or model.num_groups != 32:
        problems.append(f"GroupNorm groups {model.num_groups} over widths {widths} (transformers uses 32 groups)")
    if quant.codebook_dim is not None or quant.l2_normalized:
        problems.append("a projected or cosine codebook (transformers' quantizer is plain L2 in embed_dim)")
    if problems:
        raise ValueError(f"tokenizer {config.name!r} cannot be written as a ChameleonVQVAE: " + "; ".join(problems))
    return {"embed_dim": quant.embed_dim, "num_embeddings": quant.codebook_size, "double_latent": False,
            "latent_channels": model.z_channels, "resolution": model.resolution, "in_channels": model.in_channels,
            "base_channels": model.base_channels, "channel_multiplier": list(model.channel_multipliers),
            "num_res_blocks": model.num_res_blocks, "attn_resolutions": None, "dropout": model.dropout,
            "attn_type": "vanilla" if model.attention_at_lowest else "none", "model_type": "chameleon_vqgan"}


def config_from_meta_weights(state: dict[str, torch.Tensor], resolution: int = 512) -> VQConfig:
    """Read a taming/Meta VQGAN's shape off its weights (its yaml is not needed)."""
    try:
        base = state["encoder.conv_in.weight"].shape[0]
        levels = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.down."))
        blocks = 1 + max(int(k.split(".")[4]) for k in state if k.startswith("encoder.down.0.block."))
        widths = [state[f"encoder.down.{level}.block.0.conv1.weight"].shape[0] for level in range(levels)]
        codebook_size, embed_dim = state["quantize.embedding.weight"].shape
        z_channels = state["encoder.conv_out.weight"].shape[0]
        in_channels = state["encoder.conv_in.weight"].shape[1]
    except (KeyError, ValueError) as err:
        raise ValueError(f"not a VQGAN encoder/quantizer state dict (missing {err})") from None
    if any(".attn." in k for k in state if k.startswith(("encoder.down.", "decoder.up."))):
        raise ValueError("this VQGAN has attention blocks outside the middle (attn_resolutions); vqtok has none")
    if any(width % base for width in widths):
        raise ValueError(f"encoder widths {widths} are not multiples of the base width {base}")
    vq_config = {"base_channels": base, "channel_multiplier": [w // base for w in widths], "num_res_blocks": blocks,
                 "latent_channels": z_channels, "embed_dim": embed_dim, "num_embeddings": codebook_size,
                 "in_channels": in_channels, "resolution": resolution,
                 "attn_type": "vanilla" if "encoder.mid.attn_1.q.weight" in state else "none"}
    return config_from_hf(vq_config, has_decoder=any(k.startswith("decoder.") for k in state), where="VQGAN weights")


# -- names --------------------------------------------------------------------------------------------------------
def _resblock(external: str, ours: str, shortcut: bool) -> list[tuple[str, str]]:
    names = ["norm1", "conv1", "norm2", "conv2"] + (["nin_shortcut"] if shortcut else [])
    return [(f"{external}.{name}.{p}", f"{ours}.{'skip' if name == 'nin_shortcut' else name}.{p}")
            for name in names for p in ("weight", "bias")]


def _middle(external: str, ours: str, attention: bool) -> list[tuple[str, str]]:
    pairs = _resblock(f"{external}.block_1", f"{ours}.0", False)
    if attention:  # q, k, v are concatenated into qkv (see to_vqtok)
        pairs += [(f"{external}.attn_1.norm.{p}", f"{ours}.1.norm.{p}") for p in ("weight", "bias")]
        pairs += [(f"{external}.attn_1.proj_out.{p}", f"{ours}.1.proj.{p}") for p in ("weight", "bias")]
    return pairs + _resblock(f"{external}.block_2", f"{ours}.{2 if attention else 1}", False)


def name_pairs(config: VQConfig) -> list[tuple[str, str]]:
    """(taming/transformers name, vqtok name) for every tensor copied one to one (not the qkv or the codebook)."""
    model = config.model
    widths = [model.base_channels * m for m in model.channel_multipliers]
    conv = ("weight", "bias")
    pairs = [(f"encoder.conv_in.{p}", f"encoder.conv_in.{p}") for p in conv]
    index, width_in = 0, widths[0]
    for level, width in enumerate(widths):
        for block in range(model.num_res_blocks):
            pairs += _resblock(f"encoder.down.{level}.block.{block}", f"encoder.down.{index}", width_in != width)
            index, width_in = index + 1, width
        if level != len(widths) - 1:
            pairs += [(f"encoder.down.{level}.downsample.conv.{p}", f"encoder.down.{index}.conv.{p}") for p in conv]
            index += 1
    pairs += _middle("encoder.mid", "encoder.mid", model.attention_at_lowest)
    pairs += [(f"encoder.{n}.{p}", f"encoder.{n}.{p}") for n in ("norm_out", "conv_out") for p in conv]
    pairs += [(f"{n}.{p}", f"{n}.{p}") for n in ("quant_conv", "post_quant_conv") for p in conv]
    if model.has_decoder:
        pairs += [(f"decoder.conv_in.{p}", f"decoder.conv_in.{p}") for p in conv]
        pairs += _middle("decoder.mid", "decoder.mid", model.attention_at_lowest)
        index, width_in = 0, widths[-1]
        for level in reversed(range(len(widths))):
            for block in range(model.num_res_blocks + 1):
                pairs += _resblock(f"decoder.up.{level}.block.{block}", f"decoder.up.{index}", width_in != widths[level])
                index, width_in = index + 1, widths[level]
            if level != 0:
                pairs += [(f"decoder.up.{level}.upsample.conv.{p}", f"decoder.up.{index}.conv.{p}") for p in conv]
                index += 1
        pairs += [(f"decoder.{n}.{p}", f"decoder.{n}.{p}") for n in ("norm_out", "conv_out") for p in conv]
    return pairs


def _attention_parts(config: VQConfig) -> list[str]:
    parts = ["encoder.mid"] + (["decoder.mid"] if config.model.has_decoder else [])
    return parts if config.model.attention_at_lowest else []


def to_vqtok(external: dict[str, torch.Tensor], config: VQConfig, where: str) -> dict[str, torch.Tensor]:
    """taming/transformers-named tensors (no prefix) -> a vqtok VQModel state dict; shapes are checked by the
    caller's load (`load_weights`) and here for the pieces this function assembles."""
    missing = [name for name, _ in name_pairs(config) if name not in external]
    missing += [f"{part}.attn_1.{x}.weight" for part in _attention_parts(config) for x in "qkv"
                if f"{part}.attn_1.{x}.weight" not in external]
    if "quantize.embedding.weight" not in external:
        missing.append("quantize.embedding.weight")
    if missing:
        raise ValueError(f"{where}: missing tensor(s) {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    state = {ours: external[name] for name, ours in name_pairs(config)}
    for part in _attention_parts(config):
        for p in ("weight", "bias"):
            state[f"{part}.1.qkv.{p}"] = torch.cat([external[f"{part}.attn_1.{x}.{p}"] for x in "qkv"])
    codes = external["quantize.embedding.weight"].float()
    expected = (config.quantizer.codebook_size, config.quantizer.embed_dim)
    if tuple(codes.shape) != expected:
        raise ValueError(f"{where}: tensor quantize.embedding.weight has shape {tuple(codes.shape)}, the config "
                         f"says {expected}")
    state[CODEBOOK + "embed"] = codes[None].clone()
    state[CODEBOOK + "embed_avg"] = codes[None].clone()
    state[CODEBOOK + "cluster_size"] = torch.ones(1, codes.shape[0])
    state[CODEBOOK + "initted"] = torch.tensor(True)
    return state


def from_vqtok(state: dict[str, torch.Tensor], config: VQConfig) -> dict[str, torch.Tensor]:
    """A vqtok VQModel state dict -> taming/transformers names (the inverse of to_vqtok; decoder if present)."""
    external = {name: state[ours] for name, ours in name_pairs(config)}
    channels = config.model.base_channels * config.model.channel_multipliers[-1]
    for part in _attention_parts(config):
        for p in ("weight", "bias"):
            for x, tensor in zip("qkv", state[f"{part}.1.qkv.{p}"].split(channels)):
                external[f"{part}.attn_1.{x}.{p}"] = tensor
    external["quantize.embedding.weight"] = state[CODEBOOK + "embed"][0]
    return external


# -- reading checkpoints ------------------------------------------------------------------------------------------
def read_safetensors_dir(directory: Path, prefix: str = "", exclude: str | None = None) -> dict[str, torch.Tensor]:
    """Every tensor whose name starts with `prefix` (stripped) and not with `exclude`, from `model.safetensors`
    or the shards listed in `model.safetensors.index.json`; only the needed shards are opened."""
    from safetensors import SafetensorError, safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no weight_map object")
        files = sorted({confined(directory, file, f"{index} shard") for name, file in weight_map.items()
                        if name.startswith(prefix)})
    elif (directory / "model.safetensors").is_file():
        files = [directory / "model.safetensors"]
    else:
        raise FileNotFoundError(f"{directory}: no model.safetensors or model.safetensors.index.json")
    tensors = {}
    for path in files:
        tensor_shapes(path)  # names the file when it is missing, truncated or not safetensors
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    if name.startswith(prefix) and not (exclude and name.startswith(exclude)):
                        tensors[name[len(prefix):]] = handle.get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path}: unreadable safetensors data ({err})") from None
    return tensors


def read_meta_vqgan(path: Path) -> dict[str, torch.Tensor]:
    """Meta's VQGAN weights: a `.safetensors` file, or `vqgan.ckpt` (torch.load with weights_only=True: nothing
    but tensors and plain containers is unpickled). The Lightning `state_dict` is unwrapped; loss weights dropped."""
    if not path.is_file():
        raise FileNotFoundError(f"VQGAN checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        state = load_tensors(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # an unpickling refusal or a corrupt file: name the file
            raise ValueError(f"{path}: not a weights-only torch checkpoint ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}); nothing else is unpickled here. "
                             "If you trust the file, save its state_dict as .safetensors and pass that") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    return {k: v for k, v in state.items() if not k.startswith(META_IGNORED_PREFIXES)}


def convert(out: str | os.PathLike, hf: str | os.PathLike | None = None, meta: str | os.PathLike | None = None,
            resolution: int | None = None) -> Path:
    """Write a vqtok checkpoint directory (model.safetensors, config.json, meta.json) converted from a
    transformers Chameleon checkpoint directory (`hf`: encoder + quantizer) and/or Meta's VQGAN (`meta`:
    encoder + quantizer + decoder). With both, the Meta weights must agree with the transformers encoder and
    codebook (they are the same tokenizer) and contribute the decoder. Returns the directory."""
    from .checkpoint import save_checkpoint
    from .model import VQModel

    if hf is None and meta is None:
        raise ValueError("give a transformers Chameleon checkpoint directory, Meta's VQGAN weights, or both")
    external: dict[str, torch.Tensor] = {}
    config = None
    if hf is not None:
        hf = Path(hf)
        config_path = hf / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{hf}: missing config.json (a transformers Chameleon checkpoint directory)")
        info = read_json(config_path)
        vq_config = info.get("vq_config", info if info.get("model_type") == "chameleon_vqgan" else None)
        if vq_config is None:
            raise ValueError(f"{config_path}: no vq_config (not a Chameleon checkpoint)")
        prefix = HF_PREFIX if info.get("model_type") == "chameleon" else ""
        external = read_safetensors_dir(hf, prefix)
        config = config_from_hf(vq_config, where=f"{config_path}: vq_config")
    if meta is not None:
        meta_state = read_meta_vqgan(Path(meta))
        meta_config = config_from_meta_weights(meta_state, resolution or (config.model.resolution if config else 512))
        if config is not None:
            _check_same_encoder(external, meta_state, config, Path(meta))
        external, config = {**external, **meta_state}, meta_config
    if resolution is not None:
        config = replace(config, model=replace(config.model, resolution=resolution)).validate()
    model = VQModel(config)
    state = to_vqtok(external, config, str(hf or meta))
    expected = model.state_dict()
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(f"{hf or meta}: tensor {name} has shape {tuple(tensor.shape)}, the config expects "
                             f"{tuple(expected[name].shape)}")
    model.load_state_dict({name: tensor.to(expected[name].dtype) for name, tensor in state.items()})
    source = {"hf": str(hf) if hf else None, "meta": str(meta) if meta else None}
    directory = save_checkpoint(out, 0, model.state_dict(), config, {}, {}, {"converted_from": source})
    return directory


def _check_same_encoder(hf_state: dict, meta_state: dict, config: VQConfig, where: Path) -> None:
    """Refuse a Meta decoder paired with a different tokenizer's encoder (the codes would not match)."""
    for name in ("quantize.embedding.weight", "encoder.conv_in.weight"):
        if name not in hf_state or name not in meta_state:
            continue
        a, b = hf_state[name].float(), meta_state[name].float()
        if a.shape != b.shape or not torch.allclose(a, b, atol=1e-3, rtol=1e-2):
            raise ValueError(f"{where}: tensor {name} differs from the transformers checkpoint's: the decoder "
                             "belongs to another tokenizer")

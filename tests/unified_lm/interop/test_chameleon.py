"""Chameleon interop, checked against transformers' own implementation (tiny random checkpoints, offline).

transformers is a test-time peer: these tests are skipped where it is not installed (the README's test command
installs it). fp32 throughout; the parity bound is the issue's 1e-4 max abs difference of logits.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from unified_lm.cli import main as unified_main  # noqa: E402

# before transformers: random_checkpoint puts the torchvision import shim in place (vqtok.compat)
from unified_lm.interop.random_checkpoint import build_hf_checkpoint, tiny_vq_config  # noqa: E402  # isort: skip
from transformers import ChameleonForConditionalGeneration, ChameleonVQVAE, ChameleonVQVAEConfig  # noqa: E402  # isort: skip
from unified_lm.interop.chameleon import code_of_name, export_chameleon, image_token_name, import_chameleon  # noqa: E402
from unified_lm.model.checkpoint import load_model  # noqa: E402
from vqtok import chameleon as vq_chameleon  # noqa: E402
from vqtok.checkpoint import load_tokenizer  # noqa: E402

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(transformers model, its directory, our imported checkpoint directory) for the default tiny config."""
    root = tmp_path_factory.mktemp("chameleon")
    hf = build_hf_checkpoint(root / "hf")
    return hf, root / "hf", import_chameleon(root / "hf", root / "ours")


def unmasked_logits(hf: ChameleonForConditionalGeneration, ids: torch.Tensor) -> torch.Tensor:
    """transformers' forward sets image-token logits to the dtype's minimum; its lm_head on the final hidden
    states gives every logit."""
    with torch.no_grad():
        return hf.lm_head(hf.model(ids).last_hidden_state)


def mixed_ids(vocab, rng: np.random.Generator, pictures: int = 2) -> torch.Tensor:
    ids = [vocab.special.bos] + vocab.encode_text("the red circle sits left of a blue square")
    for _ in range(pictures):
        ids += vocab.image_ids(rng.integers(0, vocab.codebook_size, (8, 8))).tolist()
        ids += vocab.encode_text(" while green triangles float above quiet water")
    return torch.tensor([ids])


def text_columns(vocab) -> torch.Tensor:
    return torch.from_numpy(~vocab.image_mask)


def test_image_token_names_round_trip():
    assert image_token_name(0) == "IMGIMGAZ" and image_token_name(8191) == "IMGIMGIBJBZ"
    assert all(code_of_name(image_token_name(code)) == code for code in (0, 7, 10, 4095, 8191))
    with pytest.raises(ValueError, match="not an image-code token"):
        code_of_name("IMGIMGxZ")


@pytest.mark.parametrize("options", [dict(), dict(swin_norm=True, tie_word_embeddings=True, kv_heads=4)],
                         ids=["pre-norm+gqa", "norm-reordering+tied"])
def test_logits_match_transformers(tmp_path, options):
    hf = build_hf_checkpoint(tmp_path / "hf", seed=3, **options)
    loaded = load_model(import_chameleon(tmp_path / "hf", tmp_path / "ours"))
    assert loaded.config.model.norm_reordering == options.get("swin_norm", False)
    assert loaded.config.model.tied_embeddings == options.get("tie_word_embeddings", False)
    vocab, rng = loaded.vocab, np.random.default_rng(0)
    text_only = torch.tensor([[vocab.special.bos] + vocab.encode_text("small yellow stars shine over seven tall trees "
                                                                      "near the old stone bridge and the red circle")])
    for ids in (text_only, mixed_ids(vocab, rng)):
        with torch.no_grad():
            ours = loaded.model(ids)
            theirs = hf(ids).logits
        assert (ours - unmasked_logits(hf, ids)).abs().max() <= TOLERANCE
        # transformers' own forward (image logits masked) agrees on every other column
        assert (ours[..., text_columns(vocab)] - theirs[..., text_columns(vocab)]).abs().max() <= TOLERANCE
    # the QK-norm weights are per head and random: a model that ignored them would differ
    q_norm = loaded.model.layers[0].attention.q_norm
    assert q_norm.weight.shape == (4, 16) and q_norm.weight.std() > 0.05 and q_norm.bias.abs().max() > 0.1


def test_sharded_checkpoint(converted, tmp_path):
    """Real checkpoints come in shards with model.safetensors.index.json."""
    hf, _, ours = converted
    import shutil

    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="100KB")
    shutil.copy(ours.parent / "hf" / "tokenizer.json", sharded / "tokenizer.json")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 3
    again = import_chameleon(sharded, tmp_path / "ours")
    from safetensors.torch import load_file

    original, converted_again = load_file(ours / "model.safetensors"), load_file(again / "model.safetensors")
    assert all(torch.equal(original[k], converted_again[k]) for k in original)


def test_vocabulary_uses_the_checkpoints_own_ids(converted):
    hf, source, ours = converted
    vocab = load_model(ours).vocab
    vocabulary_map = json.loads((source / "config.json").read_text())["vocabulary_map"]
    for code in range(vocab.codebook_size):
        assert vocab.image_token_ids[code] == vocabulary_map[image_token_name(code)]
    # the fixture shuffles the image tokens: no offset maps codes to ids
    assert not (np.diff(vocab.image_token_ids) == 1).all()
    assert (vocab.special.boi, vocab.special.eoi, vocab.special.image) == (
        vocabulary_map["<racm3:break>"], vocabulary_map["<eoss>"], vocabulary_map["<image>"])
    assert (vocab.special.bos, vocab.special.pad, vocab.special.eos) == (0, 1, 2)
    # text: the tokenizer.json's pieces; reserved and other special added tokens are not text
    assert not vocab.is_text(vocabulary_map["<reserved08706>"]) and not vocab.is_text(vocabulary_map["<unk>"])
    text = "green triangles float above quiet water"
    assert vocab.decode_text(vocab.encode_text(text)) == text
    codes = np.arange(vocab.codebook_size)
    assert (vocab.image_codes(vocab.image_ids(codes)[1:-1]) == codes).all()


def test_pixels_through_both_models(converted):
    """transformers tokenizes the picture with its VQ and splices it at <image> placeholders; we encode with the
    converted tokenizer and map codes through the vocabulary: the logits must agree."""
    hf, _, ours = converted
    loaded = load_model(ours)
    tokenizer, _ = load_tokenizer(ours / "tokenizer")
    vocab = loaded.vocab
    torch.manual_seed(1)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    codes = tokenizer.encode(pixels)
    assert codes.shape == (2, 8, 8)
    prefix = [vocab.special.bos] + vocab.encode_text("the red")
    suffix = vocab.encode_text(" circle sits left")
    ours_ids = prefix + vocab.image_ids(codes[0].numpy()).tolist() + vocab.image_ids(codes[1].numpy()).tolist() + suffix
    placeholder = [vocab.special.boi] + [vocab.special.image] * 64 + [vocab.special.eoi]
    hf_ids = prefix + placeholder + placeholder + suffix
    with torch.no_grad():
        ours_logits = loaded.model(torch.tensor([ours_ids]))
        theirs = hf(torch.tensor([hf_ids]), pixel_values=pixels).logits
    columns = text_columns(vocab)
    assert (ours_logits[..., columns] - theirs[..., columns]).abs().max() <= TOLERANCE


def test_vq_codes_equal_transformers(tmp_path):
    torch.manual_seed(0)
    config = ChameleonVQVAEConfig(**tiny_vq_config(64))
    hf = ChameleonVQVAE(config).eval()
    with torch.no_grad():
        for parameter in hf.parameters():
            parameter.normal_(0.0, 0.15)
    hf.save_pretrained(tmp_path / "vq")
    vq_chameleon.convert(tmp_path / "ours", hf=tmp_path / "vq")
    ours, meta = load_tokenizer(tmp_path / "ours")
    assert ours.decoder is None and ours.config.model.resample == "lanczos"
    pixels = torch.rand(6, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        theirs = hf.encode(pixels)
        latents = ours.quant_conv(ours.encoder(pixels))
    assert torch.equal(ours.encode(pixels).view(6, -1), theirs.image_tokens.view(6, -1))
    # the continuous latents before the lookup agree too (not only their argmin)
    reference = hf.quant_conv(hf.encoder(pixels)).detach()
    assert (latents - reference).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="no decoder"):
        ours.decode(torch.zeros(1, 8, 8, dtype=torch.long))


def meta_vqgan_state(hf_dir: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """A taming/Meta-layout VQGAN state dict: transformers' encoder + codebook names (the same in both
    releases) plus a decoder in taming's names, plus the GAN-loss weights a training checkpoint carries."""
    vq_chameleon.convert(tmp_path / "encoder-only", hf=hf_dir)
    encoder_only, _ = load_tokenizer(tmp_path / "encoder-only")
    full_config = encoder_only.config
    full_config.model.has_decoder = True
    from vqtok.model import VQModel

    torch.manual_seed(5)
    full = VQModel(full_config)
    full.load_state_dict(encoder_only.state_dict(), strict=False)  # the same encoder, codebook and 1x1 convs
    with torch.no_grad():
        for parameter in full.decoder.parameters():
            parameter.normal_(0.0, 0.1)
    state = vq_chameleon.read_safetensors_dir(hf_dir, vq_chameleon.HF_PREFIX)
    decoder = {k: v for k, v in vq_chameleon.from_vqtok(full.state_dict(), full_config).items()
               if k.startswith("decoder.")}
    return {**state, **decoder, "loss.discriminator.main.0.weight": torch.zeros(4, 3, 4, 4)}, full


def test_meta_vqgan_checkpoint_with_decoder(converted, tmp_path):
    hf, hf_dir, _ = converted
    state, reference = meta_vqgan_state(hf_dir, tmp_path)
    ckpt = tmp_path / "vqgan.ckpt"
    torch.save({"state_dict": state, "global_step": 1000}, ckpt)
    vq_chameleon.convert(tmp_path / "meta", meta=ckpt)
    tokenizer, _ = load_tokenizer(tmp_path / "meta")
    assert tokenizer.decoder is not None
    pixels = torch.rand(3, 3, 32, 32) * 2 - 1
    codes = tokenizer.encode(pixels)
    assert torch.equal(codes.view(3, -1), hf.model.vqmodel.encode(pixels).image_tokens.view(3, -1))
    with torch.no_grad():
        assert torch.allclose(tokenizer.decode(codes), reference.decode(codes), atol=1e-6)
    # transformers' encoder + Meta's decoder in one tokenizer; a decoder of another tokenizer is refused
    vq_chameleon.convert(tmp_path / "both", hf=hf_dir, meta=ckpt)
    assert load_tokenizer(tmp_path / "both")[0].decoder is not None
    other = dict(state, **{"quantize.embedding.weight": torch.randn_like(state["quantize.embedding.weight"])})
    torch.save({"state_dict": other}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="quantize.embedding.weight differs"):
        vq_chameleon.convert(tmp_path / "mixed", hf=hf_dir, meta=tmp_path / "other.ckpt")


def test_meta_checkpoint_is_never_unpickled(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("unpickled!",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hook": Payload()}, path)
    with pytest.raises(ValueError, match="weights-only"):
        vq_chameleon.read_meta_vqgan(path)


def test_export_loads_in_transformers_with_the_same_logits(converted, tmp_path):
    hf, source, ours = converted
    exported = export_chameleon(ours, tmp_path / "exported")
    again = ChameleonForConditionalGeneration.from_pretrained(exported).eval()
    original, reloaded = hf.state_dict(), again.state_dict()
    assert set(original) == set(reloaded)
    assert all(torch.equal(original[name], reloaded[name]) for name in original)  # VQ encoder and codebook too
    source_config, exported_config = (json.loads((d / "config.json").read_text()) for d in (source, exported))
    assert exported_config["vocabulary_map"] == source_config["vocabulary_map"]
    loaded = load_model(ours)
    ids = mixed_ids(loaded.vocab, np.random.default_rng(2), pictures=1)
    with torch.no_grad():
        assert (loaded.model(ids) - unmasked_logits(again, ids)).abs().max() <= TOLERANCE


def test_native_model_exports_and_comes_back(tmp_path, lm_data):
    """A model of this codebase (sentencepiece vocabulary, our id layout, a vqtok tokenizer) -> transformers ->
    back: the same logits in transformers, and the re-imported checkpoint has the same ids and weights."""
    from unified_lm.model.checkpoint import write_model_files
    from unified_lm.model.config import preset
    from unified_lm.model.transformer import UnifiedTransformer
    from unified_lm.tokens.vocab import Vocabulary
    from vqtok.checkpoint import save_checkpoint
    from vqtok.model import VQModel

    vq_config = vq_chameleon.config_from_hf(tiny_vq_config(64), has_decoder=True)
    torch.manual_seed(0)
    vq_dir = save_checkpoint(tmp_path / "vq", 0, VQModel(vq_config).state_dict(), vq_config, {}, {}, {})
    identity = json.loads((vq_dir / "meta.json").read_text())["tokenizer"]
    vocab = Vocabulary(lm_data.vocab.text.data, 64, identity)
    config = preset("tiny")
    config.model.vocab_size = vocab.size
    config.model.qk_norm_eps = 1e-5
    config.model.image_positions = 0  # Chameleon's format has no picture position table (export refuses one)
    model = UnifiedTransformer(config.model).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(0.2 * torch.randn_like(parameter))
    run = write_model_files(tmp_path / "run", model.state_dict(), config, vocab, {"step": 0, "image_grids": {"8x8": 1}})
    exported = export_chameleon(run, tmp_path / "hf", tokenizer=tmp_path / "vq")
    hf = ChameleonForConditionalGeneration.from_pretrained(exported).eval()
    ids = [vocab.special.bos] + vocab.encode_text("a red circle") + vocab.image_ids(np.arange(64)).tolist()
    ids = torch.tensor([ids + vocab.encode_text(" above")])
    with torch.no_grad():
        assert (model(ids) - unmasked_logits(hf, ids)).abs().max() <= TOLERANCE
    back = load_model(import_chameleon(exported, tmp_path / "back"))
    same_layout = {k: v for k, v in vocab.describe().items() if k != "tokenizer"}
    assert {k: v for k, v in back.vocab.describe().items() if k != "tokenizer"} == same_layout
    state = model.state_dict()
    assert all(torch.equal(back.model.state_dict()[k], state[k]) for k in state)
    back_tokenizer, _ = load_tokenizer(tmp_path / "back" / "tokenizer")
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    original, _ = load_tokenizer(tmp_path / "vq")
    assert torch.equal(back_tokenizer.encode(pixels), original.encode(pixels))
    # a model transformers' Chameleon cannot hold is refused, naming the field
    config.model.qk_norm = False
    plain = write_model_files(tmp_path / "plain", UnifiedTransformer(config.model).state_dict(), config, vocab, {})
    with pytest.raises(ValueError, match="qk_norm is false"):
        export_chameleon(plain, tmp_path / "nope")


def test_greedy_text_generation_matches_transformers_generate(converted):
    """Our sampler (KV cache, greedy) and transformers' generate pick the same tokens when both allow the same
    ids (transformers masks image tokens; the sampler's text mode also leaves out the special tokens)."""
    from unified_lm.generate.sampler import Sampler
    from unified_lm.generate.sampling import ModalitySampling, SamplingConfig
    from unified_lm.generate.segments import Prompt

    hf, _, ours = converted
    loaded = load_model(ours)
    vocab = loaded.vocab
    sampler = Sampler(loaded.model, vocab, (8, 8))
    prompts = [Prompt(["the red circle sits"]), Prompt(["green triangles"])]
    config = SamplingConfig(mode="text", max_new_tokens=24, text=ModalitySampling(temperature=0.0))
    documents = sampler.generate(prompts, config)
    allowed = vocab.text_mask
    allowed[vocab.special.eos] = True
    suppress = np.flatnonzero(~allowed & ~vocab.image_mask).tolist()
    for prompt, document in zip(prompts, documents):
        ids = torch.tensor([sampler.encode_prompt(prompt, "text")])
        out = hf.generate(ids, max_new_tokens=len(document.tokens), do_sample=False, suppress_tokens=suppress,
                          eos_token_id=vocab.special.eos, pad_token_id=vocab.special.pad)
        assert out[0, ids.shape[1]:].tolist() == document.tokens


def test_sampler_draws_with_the_checkpoints_image_ids(converted, tmp_path):
    """Anole-style use: image mode generates the checkpoint's image ids, decoded through the converted table
    and Meta's decoder into pictures."""
    hf, hf_dir, _ = converted
    state, _ = meta_vqgan_state(hf_dir, tmp_path)
    from safetensors.torch import save_file

    save_file(state, tmp_path / "vqgan.safetensors")
    out = tmp_path / "with-decoder"
    assert unified_main(["import-chameleon", str(hf_dir), str(out), "--meta-vqgan",
                         str(tmp_path / "vqgan.safetensors")]) == 0
    from PIL import Image

    from vqtok.images import load_rgb, preprocess, to_tensor

    picture = tmp_path / "prompt.png"  # non-square with transparency: resize, crop and alpha on white apply
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 60, 4), dtype=np.uint8), "RGBA").save(picture)
    samples = tmp_path / "samples"
    assert unified_main(["sample", "--ckpt", str(out), "--prompt", "a red circle", "--image", str(picture),
                         "--mode", "image", "--out", str(samples), "--num-samples", "2"]) == 0
    vocab = load_model(out).vocab
    tokenizer, _ = load_tokenizer(out / "tokenizer")
    expected = tokenizer.encode(to_tensor(preprocess(load_rgb(picture), 32, "lanczos"))[None])[0]
    prompt = json.loads((samples / "sample-000.json").read_text())["prompt"]
    assert np.array_equal([s for s in prompt if s["type"] == "image"][0]["codes"], expected.numpy())
    for number in range(2):
        document = json.loads((samples / f"sample-{number:03d}.json").read_text())
        assert (samples / "images" / f"sample-{number:03d}-1.png").is_file()
        image = [s for s in document["segments"] if s["type"] == "image"][0]
        assert np.asarray(image["codes"]).shape == (8, 8)
        ids = vocab.image_ids(np.asarray(image["codes"]))
        assert set(ids[1:-1].tolist()) <= set(vocab.image_token_ids.tolist())


@pytest.mark.slow
def test_imported_checkpoint_fine_tunes(converted, lm_data, tmp_path, train_unified):
    """The fine-tuning path: pack world documents with the imported vocabulary and tokenizer, then train a few
    DeepSpeed steps starting from the imported weights."""
    from safetensors.torch import load_file

    from unified_lm.data.prepare import PrepareSettings, prepare
    from unified_lm.model.checkpoint import resolve_run

    _, _, ours = converted
    packed = tmp_path / "packed"
    prepare([str(lm_data.documents)], str(ours / "vocab"), str(packed), PrepareSettings(seq_len=128, split="train"),
            tokenizer=str(ours / "tokenizer"))
    run = tmp_path / "run"
    train_unified(packed, run, "--model", str(ours / "config.json"), "--set", f"train.init_from={ours}",
          "--set", "train.seq_len=128", "--set", "train.steps=3", "--set", "train.micro_batch_size=2",
          "--set", "train.lr=1e-3")
    before, after = load_file(ours / "model.safetensors"), load_file(resolve_run(run) / "model.safetensors")
    assert set(before) == set(after)
    assert not torch.equal(before["layers.0.attention.q_proj.weight"], after["layers.0.attention.q_proj.weight"])
    assert (before["embed.weight"] - after["embed.weight"]).abs().max() < 0.05  # started from the imported weights
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert records and all(np.isfinite(r["loss"]) for r in records) and records[0]["image_tokens"] > 0


def test_chameleon_preprocessing(tmp_path, converted):
    """Resize (Lanczos), centre crop, alpha on white: against Meta's preprocessing written out in numpy/PIL."""
    from PIL import Image

    from vqtok.images import load_rgb, preprocess

    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (45, 70, 4), dtype=np.uint8)
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    tokenizer, _ = load_tokenizer(converted[2] / "tokenizer")
    ours = preprocess(load_rgb(path), 32, tokenizer.config.model.resample).astype(np.float64)
    alpha = rgba[..., 3:] / 255.0  # Meta: _whiten_transparency, then resize (Lanczos) and crop
    white = Image.fromarray(((1 - alpha) * 255 + alpha * rgba[..., :3]).astype(np.uint8), "RGB")
    scale = 32 / min(white.size)
    white = white.resize((round(scale * white.size[0]), round(scale * white.size[1])), Image.LANCZOS)
    left, top = (white.width - 32) // 2, (white.height - 32) // 2
    meta = np.asarray(white.crop((left, top, left + 32, top + 32)), dtype=np.float64)
    assert ours.shape == meta.shape == (32, 32, 3)
    assert np.abs(ours - meta).max() <= 2  # PIL's alpha_composite rounds where Meta truncates


def test_bad_checkpoints_are_refused_by_name(converted, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    _, source, _ = converted
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    state = load_file(broken / "model.safetensors")
    state["model.layers.1.self_attn.k_norm.weight"] = torch.ones(3, 16)
    save_file(state, broken / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_norm\.weight has shape \(3, 16\)"):
        import_chameleon(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    config = json.loads((source / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(dict(config, attention_bias=True)))
    with pytest.raises(ValueError, match="attention_bias=true"):
        import_chameleon(broken, tmp_path / "out")
    missing_code = {k: v for k, v in config["vocabulary_map"].items() if k != image_token_name(5)}
    (broken / "config.json").write_text(json.dumps(dict(config, vocabulary_map=missing_code)))
    shutil.copy(source / "model.safetensors", broken / "model.safetensors")
    with pytest.raises(ValueError, match="first missing: code 5"):
        import_chameleon(broken, tmp_path / "out")
    (broken / "config.json").write_text(json.dumps(config))
    (broken / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        import_chameleon(broken, tmp_path / "out")
    vq = dict(config["vq_config"], base_channels=24)
    with pytest.raises(ValueError, match="multiples of 32"):
        vq_chameleon.config_from_hf(vq)
    assert unified_main(["import-chameleon", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2


@pytest.mark.slow
def test_benchmark_script_runs_small(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "bench"
    subprocess.run([sys.executable, "scripts/bench_chameleon.py", "--small", "--out", str(out), "--threads", "1"],
                   check=True, cwd=Path(__file__).resolve().parents[3], capture_output=True, timeout=300)
    results = json.loads((out / "results.json").read_text())
    ours = [row for row in results["rows"] if row["impl"] == "ours"]
    assert ours[0]["what"] == "forward" and ours[0]["max_abs_logit_diff_vs_transformers"] <= TOLERANCE
    assert all(row["same_ids_as_transformers"] for row in ours if row["what"].startswith("text generation"))
    assert any(row.get("pictures_complete") for row in results["rows"])

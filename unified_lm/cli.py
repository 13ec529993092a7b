"""The `unified-lm` command: build the vocabulary, generate the embedded world corpus, pack training data.

    unified-lm vocab   --tokenizer VQRUN --text default [--text MORE.txt] [--world DIR] --text-vocab-size 4000 --out VOCAB
    unified-lm world   --out DIR [--scenes 2000] [--seed 0] [--image-size 64]
    unified-lm prepare DOCS.jsonl [...] --vocab VOCAB --out PACKED [--tokens STORE ...] [--tokenizer VQRUN]
                       [--seq-len 512] [--train-on all|text|image] [--split train] [--text-documents N]
                       [--kinds image_to_text,qa] [--encoder ENCRUN [--pool 1]]   (--encoder: continuous pictures)
    unified-lm sample  --ckpt RUN --tokenizer VQRUN --prompt TEXT [--image PATH ...] [--prompts FILE.jsonl]
                       --mode interleaved|text|image|understanding --out DIR [--cfg none|2way|3way] [--num-samples N]
    unified-lm eval    --ckpt RUN --tokenizer VQRUN --world DIR --out EVAL [--photos DIR] [--count N]
                       -> EVAL/eval.json, EVAL/index.html (the report), EVAL/report.png
    unified-lm encoder train --world DIR --vocab VOCAB --out RUN [--preset small] [--loss siglip|infonce]
                       [--steps N] [--set KEY=VALUE ...] [--pairs FILE.jsonl] [--resume | --restart]
                       -> RUN/latest, RUN/log.jsonl, RUN/zero_shot.json (the contrastive image encoder)
    unified-lm encoder eval --encoder RUN --world DIR [--split heldout]   zero-shot accuracies, one JSON line
    unified-lm understand --discrete NAME=RUN --continuous NAME=RUN [...] --world DIR --tokenizer VQRUN --out DIR
                       -> DIR/understanding.json, DIR/understanding.md (questions and captions, both picture paths)
    unified-lm import-chameleon HF_DIR OUT [--meta-vqgan vqgan.ckpt] [--dtype keep|float32|bfloat16]
                       a transformers Chameleon/Anole checkpoint -> OUT (unified_lm checkpoint, OUT/tokenizer)
    unified-lm export-chameleon RUN OUT [--tokenizer VQRUN] [--dtype keep|float32|bfloat16]
                       a unified_lm run -> OUT, which ChameleonForConditionalGeneration.from_pretrained loads

Training is `deepspeed scripts/train_unified.py` (see its --help).
Exit status: 0 success, 2 bad arguments, configuration or input (one line naming the file or field; -v adds the
traceback), including input that asks for more memory than there is.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys


def cmd_vocab(args) -> int:
    from unified_lm.tokens.text_corpus import read_texts
    from unified_lm.tokens.vocab import build_vocabulary

    tokenizer = None
    codebook_size = args.codebook_size
    if args.tokenizer:
        from vqtok.checkpoint import read_checkpoint

        _, _, meta = read_checkpoint(args.tokenizer)
        tokenizer = meta["tokenizer"]
        if codebook_size not in (None, tokenizer["codebook_size"]):
            raise ValueError(f"--codebook-size {codebook_size} contradicts tokenizer {args.tokenizer} "
                             f"(codebook_size {tokenizer['codebook_size']})")
        codebook_size = tokenizer["codebook_size"]
    if codebook_size is None:
        raise ValueError("give --tokenizer VQRUN (preferred: records which tokenizer the codes come from) or --codebook-size N")
    sources = [read_texts(path) for path in args.text or ["default"]]
    if args.world:
        from unified_lm.world.corpus import world_texts

        # world captions first and in full: the quickstart corpus's own words must become single pieces
        sources.insert(0, world_texts(args.world, split="train"))  # held-out texts stay unseen
    texts = itertools.chain.from_iterable(sources)
    vocab = build_vocabulary(args.out, None if args.spm_model else texts, args.text_vocab_size, codebook_size,
                             tokenizer, args.spm_model)
    print(json.dumps({k: v for k, v in vocab.describe().items() if k != "tokenizer"} | {"out": args.out}))
    return 0


def cmd_world(args) -> int:
    from unified_lm.world.corpus import generate_world

    mix = None
    if args.mix:
        mix = {}
        for item in args.mix.split(","):
            kind, _, share = item.partition("=")
            try:
                mix[kind.strip()] = float(share)
            except ValueError:
                raise ValueError(f"--mix expects KIND=SHARE,... (e.g. text_to_image=0.4,story=0.2), got {item!r}") from None
    summary = generate_world(args.out, num_scenes=args.scenes, seed=args.seed, image_size=args.image_size,
                             kinds_mix=mix, heldout_fraction=args.heldout_fraction, force=args.force)
    print(json.dumps({"out": str(summary.out_dir), "documents": summary.num_documents, "images": summary.num_images,
                      "kinds": summary.kind_counts, "splits": summary.split_counts}))
    return 0


def cmd_prepare(args) -> int:
    from unified_lm.data.prepare import PrepareSettings, prepare

    picture_size, placeholders = None, 0
    if args.encoder:  # the continuous path: pictures as pixels at the encoder's size, one placeholder per feature
        from unified_lm.vision.contrastive import read_encoder_config, resolve_encoder

        vision = read_encoder_config(resolve_encoder(args.encoder)).vision
        grid = vision.image_size // vision.patch_size
        if args.pool < 1 or grid % args.pool:
            raise ValueError(f"--pool {args.pool} must divide the encoder's {grid}x{grid} patch grid")
        picture_size, placeholders = vision.image_size, (grid // args.pool) ** 2
    kinds = tuple(k for k in (args.kinds or "").split(",") if k)
    settings = PrepareSettings(seq_len=args.seq_len, default_train_on=args.train_on, split=args.split, seed=args.seed,
                               rows_per_shard=args.rows_per_shard, text_corpus=args.text_corpus,
                               text_documents=args.text_documents, image_resolution=args.image_resolution,
                               kinds=kinds, picture_size=picture_size, placeholders=placeholders,
                               caption_dropout=args.caption_dropout)
    info = prepare(args.documents, args.vocab, args.out, settings, stores=args.tokens or [],
                   tokenizer=args.tokenizer, device=args.device)
    keys = ("rows", "seq_len", "documents", "documents_by_train_on", "captions_dropped", "tokens", "target_tokens", "image_target_tokens",
            "padding_tokens", "vocab_size")
    print(json.dumps({key: info[key] for key in keys} | {"out": args.out}))
    return 0


def image_grid_of(loaded, requested: str | None) -> tuple[int, int] | None:
    """--image-grid, else the grid most of the checkpoint's training pictures had, else None."""
    from unified_lm.model.checkpoint import parse_grid

    try:
        return parse_grid(requested) if requested else loaded.image_grid
    except ValueError as err:
        raise ValueError(f"--image-grid: {err}") from None


def sampling_config(args):
    from unified_lm.generate.sampling import SamplingConfig

    return SamplingConfig.from_dict({
        "mode": args.mode, "max_new_tokens": args.max_new_tokens, "max_images": args.max_images, "seed": args.seed,
        "text": {"temperature": args.text_temperature, "top_k": args.text_top_k, "top_p": args.text_top_p,
                 "repetition_penalty": args.repetition_penalty},
        "image": {"temperature": args.image_temperature, "top_k": args.image_top_k, "top_p": args.image_top_p},
        "guidance": {"mode": args.cfg, "scale": args.cfg_scale, "image_scale": args.cfg_image_scale}})


def sampling_tokenizer(args, loaded, mode: str):
    """The vqtok tokenizer `sample` encodes and decodes pictures with (--tokenizer, else the one an imported
    checkpoint carries), checked against the checkpoint's vocabulary; None where no picture needs codes."""
    from unified_lm.model.checkpoint import tokenizer_path

    if not args.tokenizer and tokenizer_path(loaded):
        args.tokenizer = str(tokenizer_path(loaded))
    if args.tokenizer:
        from vqtok.checkpoint import load_tokenizer

        tokenizer, meta = load_tokenizer(args.tokenizer, args.device)
        loaded.vocab.check_tokenizer(meta["tokenizer"], f"tokenizer {args.tokenizer}")
        return tokenizer
    if mode in ("interleaved", "image") or (args.image and args.pictures == "discrete"):
        raise ValueError(f"mode {mode!r} needs the vqtok tokenizer the checkpoint's vocabulary was built for "
                         "(--tokenizer VQRUN) to turn pictures into codes and back")
    return None


def stream_to_stderr(with_text: bool):
    """`sample --stream`'s event handler: the text as it is drawn (one document at a time only), a mark for each
    picture."""
    def stream(event):
        if event.kind == "token" and event.text and with_text:
            print(event.text, end="", flush=True, file=sys.stderr)
        elif event.kind == "segment" and event.modality == "image":
            print(f" [picture {event.segment.codes.shape[0]}x{event.segment.codes.shape[1]}] ", end="",
                  flush=True, file=sys.stderr)
        elif event.kind == "done" and with_text:
            print(file=sys.stderr)
    return stream


def cmd_sample(args) -> int:
    import time
    from pathlib import Path

    import torch

    from unified_lm.generate.prompts import build_prompts, read_prompt_file
    from unified_lm.generate.render import write_documents
    from unified_lm.generate.sampler import Sampler
    from unified_lm.model.checkpoint import load_model

    config = sampling_config(args)
    if not args.prompt and not args.prompts:
        raise ValueError("give --prompt TEXT (repeatable) or --prompts FILE.jsonl")
    if args.num_samples < 1 or args.batch_size < 1:
        raise ValueError("--num-samples and --batch-size must be positive")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    loaded = load_model(args.ckpt, args.device, dtype)
    grid = image_grid_of(loaded, args.image_grid)
    tokenizer = sampling_tokenizer(args, loaded, config.mode)
    continuous_size = None
    if args.pictures == "continuous":
        if loaded.model.picture_adapter is None:
            raise ValueError(f"--pictures continuous: {loaded.directory} has no picture encoder (train one with "
                             "train.encoder_run)")
        continuous_size = loaded.model.picture_adapter.vision_config.image_size
    pictures = [Path(p).resolve() for p in args.image or []]
    specs = [(pictures + [text], None) for text in args.prompt or []]
    if args.prompts:
        specs += read_prompt_file(args.prompts)
    specs = [(spec, None if seed is None else seed + copy) for spec, seed in specs for copy in range(args.num_samples)]
    prompts = build_prompts(specs, tokenizer, grid, continuous_size)
    for number, prompt in enumerate(prompts):  # without its own seed, each copy draws from seed + its index
        prompt.seed = config.seed + number if prompt.seed is None else prompt.seed
    sampler = Sampler(loaded.model, loaded.vocab, grid, compile=args.compile)
    stream = stream_to_stderr(args.batch_size == 1) if args.stream else None
    documents = []
    start = time.perf_counter()
    for first in range(0, len(prompts), args.batch_size):
        batch = sampler.generate(prompts[first : first + args.batch_size], config, on_event=stream)
        for document in batch:
            document.index += first
        documents += batch
    seconds = time.perf_counter() - start
    settings = config.to_dict() | {"checkpoint": str(loaded.directory), "image_grid": list(grid) if grid else None}
    title = f"{config.mode} samples from {loaded.directory}"
    index = write_documents(args.out, documents, tokenizer, settings, title)
    stats = sampler.stats
    print(json.dumps({"out": str(index), "documents": len(documents), "mode": config.mode,
                      "pictures": sum(len(d.images) for d in documents), "tokens": stats.tokens,
                      "seconds": round(seconds, 2), "decode_tokens_per_s": round(stats.tokens_per_second, 1),
                      "finish": {r: sum(d.finish_reason == r for d in documents) for r in ("eos", "length", "image")}}))
    return 0


def cmd_eval(args) -> int:
    from pathlib import Path

    from unified_lm.eval.evaluate import EvalSettings, evaluate
    from unified_lm.eval.report import write_report
    from unified_lm.model.checkpoint import load_model
    from vqtok.checkpoint import load_tokenizer, read_checkpoint, untrained_tokenizer
    from vqtok.data import resolve_image_paths

    settings = EvalSettings(count=args.count, stories=args.stories, text_documents=args.text_documents,
                            text_corpus=args.text_corpus, guidance=args.cfg, guidance_scale=args.cfg_scale,
                            image_temperature=args.image_temperature, image_top_k=args.image_top_k,
                            batch_size=args.batch_size, seed=args.seed, baselines=not args.no_baselines,
                            baseline_count=args.baseline_count)
    counts = (settings.count, settings.stories, settings.baseline_count)
    if min(counts) < 0 or 1 in counts:  # chance scores each output against another item's truth: two at least
        raise ValueError("--count, --stories and --baseline-count must be 0 (all held-out ones) or at least 2 "
                         "(chance scores each output against another item's truth)")
    if settings.batch_size < 1 or settings.text_documents < 0:
        raise ValueError("--batch-size must be positive and --text-documents >= 0")
    loaded = load_model(args.ckpt, args.device)
    tokenizer, meta = load_tokenizer(args.tokenizer, args.device)
    loaded.vocab.check_tokenizer(meta["tokenizer"], f"tokenizer {args.tokenizer}")
    untrained = None
    if settings.baselines:
        untrained = untrained_tokenizer(read_checkpoint(args.tokenizer)[1]).to(args.device)
    photos = [] if args.photos == "none" else resolve_image_paths(args.photos, "heldout")
    result = evaluate(loaded, tokenizer, args.world, args.out, settings, photos, untrained,
                      log=lambda line: print(line, file=sys.stderr, flush=True))
    run = Path(args.ckpt) if (Path(args.ckpt) / "log.jsonl").is_file() else None
    page = write_report(args.out, run, title=f"What {loaded.directory.parent.parent.name or 'the model'} learned")
    headline = {task: {name: values.get("colour_shape", values.get("accuracy", values.get("perplexity")))
                       for name, values in columns.items() if isinstance(values, dict)}
                for task, columns in result["results"].items() if not task.startswith("tokenizer")}
    print(json.dumps({"report": str(page), "eval": str(Path(args.out) / "eval.json"), "headline": headline,
                      "seconds": round(sum(result["seconds"].values()), 1)}))
    return 0


def cmd_encoder_train(args) -> int:
    import time
    from pathlib import Path

    from runkit.runs import RunDirectory
    from runkit.typed_config import load_preset_or_file, parse_overrides
    from unified_lm.train.encoder import EncoderTrainer
    from unified_lm.vision.contrastive import PRESETS, EncoderConfig

    overrides = parse_overrides(args.set or [])
    if args.loss:
        overrides["loss"] = args.loss
    if args.steps is not None:
        overrides["train.steps"] = args.steps
    config = load_preset_or_file(args.preset, PRESETS, EncoderConfig.from_dict, "--preset")
    config = config.with_overrides(overrides).validate()
    out = Path(args.out)
    RunDirectory(out).refuse_to_overwrite(args.resume, args.restart, "an encoder checkpoint")
    trainer = EncoderTrainer(config, args.world, args.vocab, out, args.pairs, args.device,
                             progress=lambda line: print(line, file=sys.stderr, flush=True))
    if args.restart:
        RunDirectory(out).restart(files=("zero_shot.json",))
    if args.resume and trainer.resume():
        print(f"resumed {out} at step {trainer.step}", file=sys.stderr, flush=True)
    print(f"{trainer.num_parameters / 1e6:.2f}M parameters, {len(trainer.data)} captioned pictures, "
          f"loss {trainer.config.loss}, {trainer.config.train.steps} steps of {trainer.config.train.batch_size}",
          file=sys.stderr, flush=True)
    if trainer.step >= trainer.config.train.steps:
        print(json.dumps({"out": str(out), "step": trainer.step, "note": "already trained"}))
        return 0
    start = time.perf_counter()
    try:
        final = trainer.train()
    except FloatingPointError as err:
        print(f"error: training diverged: {err}", file=sys.stderr)
        return 3
    print(json.dumps({"out": str(out), "step": trainer.step, "seconds": round(time.perf_counter() - start, 1),
                      "final": final}))
    return 0


def cmd_encoder_eval(args) -> int:
    from unified_lm.train.encoder import zero_shot
    from unified_lm.vision.contrastive import encoder_vocabulary, load_encoder, resolve_encoder

    model, _ = load_encoder(args.encoder, args.device)
    result = zero_shot(model, encoder_vocabulary(args.encoder), args.world, args.split, args.device)
    print(json.dumps({"encoder": str(resolve_encoder(args.encoder)), **result}))
    return 0


def cmd_understand(args) -> int:
    from unified_lm.eval.evaluate import EvalSettings
    from unified_lm.eval.understanding import evaluate_understanding

    models = []
    for path in ("discrete", "continuous"):
        for spec in getattr(args, path) or []:
            name, _, run = spec.partition("=")
            if not run:
                raise ValueError(f"--{path} expects NAME=RUN, got {spec!r}")
            models.append((name, run, path))
    if not models:
        raise ValueError("give at least one --discrete NAME=RUN or --continuous NAME=RUN")
    tokenizer = None
    if args.tokenizer:
        from vqtok.checkpoint import load_tokenizer

        tokenizer, _ = load_tokenizer(args.tokenizer, args.device)
    settings = EvalSettings(count=args.count, text_documents=args.text_documents, text_corpus=args.text_corpus,
                            batch_size=args.batch_size, seed=args.seed, baselines=False)
    report = evaluate_understanding(models, args.world, args.out, settings, tokenizer, args.device,
                                    log=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps({"out": args.out, "qa": {n: m["qa"]["accuracy"] for n, m in report["models"].items()}}))
    return 0


def cmd_chameleon(args) -> int:
    """import-chameleon and export-chameleon (unified_lm.interop.chameleon)."""
    import torch

    from unified_lm.interop.chameleon import export_chameleon, import_chameleon

    dtype = None if args.dtype == "keep" else getattr(torch, args.dtype)
    if args.command == "import-chameleon":
        out = import_chameleon(args.source, args.out, args.meta_vqgan, dtype)
        print(json.dumps({"out": str(out), "tokenizer": str(out / "tokenizer")}))
    else:
        print(json.dumps({"out": str(export_chameleon(args.source, args.out, args.tokenizer, dtype))}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unified-lm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)
    for add_command in (add_vocab_command, add_world_command, add_prepare_command, add_sample_command,
                        add_eval_command, add_encoder_command, add_understand_command, add_chameleon_command):
        add_command(commands)
    return parser


def add_vocab_command(commands) -> None:
    """`vocab`: the sentencepiece text model and the joint vocabulary's layout."""
    vocab = commands.add_parser("vocab", help="train (or load) the sentencepiece text model and lay out the joint vocabulary")
    vocab.add_argument("--tokenizer", help="vqtok run or checkpoint whose codes the vocabulary will hold")
    vocab.add_argument("--codebook-size", type=int, help="image codes without a tokenizer checkpoint")
    vocab.add_argument("--text", action="append", help="'default' (bundled English Wikipedia summaries), a text file "
                       "(one document per line) or JSONL with a 'text' field; repeatable")
    vocab.add_argument("--world", help="also train on this world corpus's texts (from `unified-lm world`)")
    vocab.add_argument("--text-vocab-size", type=int, default=4000, help="sentencepiece BPE pieces")
    vocab.add_argument("--spm-model", help="use this existing sentencepiece model instead of training one")
    vocab.add_argument("--out", required=True)
    vocab.set_defaults(run=cmd_vocab)


def add_world_command(commands) -> None:
    """`world`: the procedural captioned world corpus."""
    world = commands.add_parser("world", help="generate the procedural captioned world corpus")
    world.add_argument("--out", required=True)
    world.add_argument("--scenes", type=int, default=2000)
    world.add_argument("--seed", type=int, default=0)
    world.add_argument("--image-size", type=int, default=64)
    world.add_argument("--mix", help="documents per kind, as shares: text_to_image=0.3,image_to_text=0.3,qa=0.25,"
                                     "story=0.15 (the default; kinds left out get none)")
    world.add_argument("--heldout-fraction", type=float, default=0.1, help="share of each kind held out (unseen scenes)")
    world.add_argument("--force", action="store_true", help="regenerate even if OUT holds a different world")
    world.set_defaults(run=cmd_world)


def add_prepare_command(commands) -> None:
    """`prepare`: documents -> packed training rows."""
    prepare = commands.add_parser("prepare", help="pack interleaved documents into training rows")
    prepare.add_argument("documents", nargs="+", help="documents JSONL file(s)")
    prepare.add_argument("--vocab", required=True, help="vocabulary directory (from `unified-lm vocab`)")
    prepare.add_argument("--out", required=True, help="packed dataset directory")
    prepare.add_argument("--tokens", action="append", help="vqtok token store(s) holding the documents' images")
    prepare.add_argument("--tokenizer", help="vqtok run to encode images no store holds (cached in OUT/image_tokens_RES)")
    prepare.add_argument("--image-resolution", type=int, help="encode size for --tokenizer (default: the tokenizer's)")
    prepare.add_argument("--seq-len", type=int, default=512, help="training sequence length, tokens")
    prepare.add_argument("--train-on", choices=("all", "text", "image"), default="all",
                         help="targets for documents without their own train_on")
    prepare.add_argument("--split", help="keep only documents whose 'split' field equals this (e.g. train)")
    prepare.add_argument("--text-corpus", default="default", help="text-only documents to mix in: 'default' or a file")
    prepare.add_argument("--text-documents", type=int, default=0, help="how many text-only documents to mix in")
    prepare.add_argument("--seed", type=int, default=0, help="document order and caption dropout")
    prepare.add_argument("--caption-dropout", type=float, default=0.1,
                         help="probability that a document training on its pictures loses all its text, so the "
                              "contexts classifier-free guidance uses ([<bos>, <boi>]; the pictures alone) are trained")
    prepare.add_argument("--rows-per-shard", type=int, default=8192)
    prepare.add_argument("--device", default="cpu", help="for --tokenizer encoding")
    prepare.add_argument("--kinds", help="keep only documents of these kinds, comma-separated (world: text_to_image, "
                         "image_to_text, qa, story)")
    prepare.add_argument("--encoder", help="continuous path: store pictures as pixels for this image encoder run "
                         "(`unified-lm encoder train`), each as <boi> <image> x features <eoi>; no tokenizer needed")
    prepare.add_argument("--pool", type=int, default=1, help="with --encoder: the adapter's average pooling of the "
                         "patch grid (model.picture.pool); sets the placeholders per picture")
    prepare.set_defaults(run=cmd_prepare)


def add_sample_command(commands) -> None:
    """`sample`: documents of text and pictures from a trained model."""
    sample = commands.add_parser("sample", help="generate documents of text and pictures from a trained model",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sample.add_argument("--ckpt", required=True, help="training run (follows latest) or checkpoint directory")
    sample.add_argument("--tokenizer", help="vqtok run the vocabulary was built for (decodes and encodes pictures)")
    sample.add_argument("--prompt", action="append", help="prompt text (repeatable: one document each)")
    sample.add_argument("--image", action="append", help="picture placed before every --prompt's text (repeatable)")
    sample.add_argument("--prompts", help="JSONL prompts: {\"segments\": [{\"image\": PATH}, {\"text\": ...}], \"seed\": N}")
    sample.add_argument("--mode", choices=("interleaved", "text", "image", "understanding"), default="interleaved")
    sample.add_argument("--out", required=True, help="output directory (index.html, sample-NNN.{md,html,json}, images/)")
    sample.add_argument("--num-samples", type=int, default=1, help="documents per prompt (seeds differ)")
    sample.add_argument("--seed", type=int, default=0, help="document i draws from seed + i")
    sample.add_argument("--max-new-tokens", type=int, default=256)
    sample.add_argument("--max-images", type=int, default=4, help="pictures per document (interleaved)")
    sample.add_argument("--text-temperature", type=float, default=0.7, help="0 = greedy")
    sample.add_argument("--text-top-k", type=int, default=0, help="0 = off")
    sample.add_argument("--text-top-p", type=float, default=0.9, help="1 = off")
    sample.add_argument("--repetition-penalty", type=float, default=1.0, help="text tokens (CTRL); 1 = off")
    sample.add_argument("--image-temperature", type=float, default=1.0)
    sample.add_argument("--image-top-k", type=int, default=0)
    sample.add_argument("--image-top-p", type=float, default=1.0)
    sample.add_argument("--cfg", choices=("none", "2way", "3way"), default="none",
                        help="classifier-free guidance for picture codes")
    sample.add_argument("--cfg-scale", type=float, default=3.0, help="2way scale; 3way text scale")
    sample.add_argument("--cfg-image-scale", type=float, default=1.2, help="3way image scale")
    sample.add_argument("--image-grid", help="picture grid HxW (default: the checkpoint's training pictures)")
    sample.add_argument("--batch-size", type=int, default=8, help="documents decoded together")
    sample.add_argument("--device", default="cpu")
    sample.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    sample.add_argument("--stream", action="store_true", help="print text to stderr as it is generated")
    sample.add_argument("--compile", action="store_true", help="torch.compile the decode step (CPU: ~40 s to compile; "
                        "pays off for long runs). On CUDA the step is a CUDA graph either way")
    sample.add_argument("--pictures", choices=("discrete", "continuous"), default="discrete",
                        help="how prompt pictures enter the model: vqtok codes, or pixels through the model's image "
                        "encoder and adapter (checkpoints trained with train.encoder_run)")
    sample.set_defaults(run=cmd_sample)


def add_eval_command(commands) -> None:
    """`eval`: held-out scores against baselines, and the report."""
    evaluate = commands.add_parser("eval", help="measure what the model learned on the held-out world and text; "
                                   "write the report", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    evaluate.add_argument("--ckpt", required=True, help="training run (follows latest; its log.jsonl gives the curves) "
                          "or checkpoint directory")
    evaluate.add_argument("--tokenizer", required=True, help="vqtok run the vocabulary was built for")
    evaluate.add_argument("--world", required=True, help="world directory (from `unified-lm world`): held-out split")
    evaluate.add_argument("--out", required=True, help="EVAL directory: eval.json, index.html, report.png, pictures/")
    evaluate.add_argument("--photos", help="held-out photos for the tokenizer rows (default: the embedded held-out "
                          "photos; 'none' skips them)")
    evaluate.add_argument("--count", type=int, default=0, help="held-out documents per world task (0: all)")
    evaluate.add_argument("--stories", type=int, default=0, help="held-out stories, the interleaved task (0: all)")
    evaluate.add_argument("--text-documents", type=int, default=100, help="held-out English documents (the corpus's "
                          "last N; 0 skips perplexity)")
    evaluate.add_argument("--text-corpus", default="default", help="'default' (Wikipedia summaries) or a text file")
    evaluate.add_argument("--cfg", choices=("none", "2way", "3way"), default="2way")
    evaluate.add_argument("--cfg-scale", type=float, default=3.0)
    evaluate.add_argument("--image-temperature", type=float, default=1.0)
    evaluate.add_argument("--image-top-k", type=int, default=0)
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--no-baselines", action="store_true", help="skip the untrained model and tokenizer")
    evaluate.add_argument("--baseline-count", type=int, default=48, help="held-out documents per task for the "
                          "untrained model (0: as many as for the trained one)")
    evaluate.add_argument("--device", default="cpu")
    evaluate.set_defaults(run=cmd_eval)


def add_encoder_command(commands) -> None:
    """`encoder train | eval`: the contrastive image encoder."""
    encoder = commands.add_parser("encoder", help="the contrastive image encoder (ViT + text tower, SigLIP/InfoNCE)")
    encoder_commands = encoder.add_subparsers(dest="encoder_command", required=True)
    encoder_train = encoder_commands.add_parser("train", help="train on the world's captioned pictures",
                                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    encoder_train.add_argument("--world", required=True, help="world directory (train split; held-out for zero-shot)")
    encoder_train.add_argument("--vocab", required=True, help="vocabulary directory (the text tower's ids)")
    encoder_train.add_argument("--out", required=True, help="run directory")
    encoder_train.add_argument("--preset", default="small", help="tiny | small | base, or a JSON config file")
    encoder_train.add_argument("--loss", choices=("siglip", "infonce"), help="default: the preset's (siglip)")
    encoder_train.add_argument("--steps", type=int, help="train.steps")
    encoder_train.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, e.g. "
                               "train.lr=5e-4 or vision.width=256 (repeatable)")
    encoder_train.add_argument("--pairs", help="extra JSONL {\"image\": PATH, \"text\": CAPTION} pairs")
    encoder_train.add_argument("--resume", action="store_true", help="continue from RUN/latest exactly")
    encoder_train.add_argument("--restart", action="store_true", help="delete RUN's checkpoints and log first")
    encoder_train.add_argument("--device", help="default: cuda if available, else cpu")
    encoder_train.set_defaults(run=cmd_encoder_train)
    encoder_eval = encoder_commands.add_parser("eval", help="zero-shot classification and retrieval on the world")
    encoder_eval.add_argument("--encoder", required=True, help="encoder run (follows latest) or checkpoint directory")
    encoder_eval.add_argument("--world", required=True, help="world directory")
    encoder_eval.add_argument("--split", choices=("heldout", "train"), default="heldout")
    encoder_eval.add_argument("--device", default="cpu")
    encoder_eval.set_defaults(run=cmd_encoder_eval)


def add_understand_command(commands) -> None:
    """`understand`: discrete vs continuous picture understanding."""
    understand = commands.add_parser("understand", help="picture understanding through discrete codes vs continuous "
                                     "features, side by side on the held-out world")
    understand.add_argument("--discrete", action="append", metavar="NAME=RUN", help="a model reading pictures as codes")
    understand.add_argument("--continuous", action="append", metavar="NAME=RUN",
                            help="a model reading pictures through its image encoder and adapter")
    understand.add_argument("--world", required=True, help="world directory (held-out split)")
    understand.add_argument("--tokenizer", help="vqtok run (needed for --discrete models)")
    understand.add_argument("--out", required=True, help="directory for understanding.json and understanding.md")
    understand.add_argument("--count", type=int, default=0, help="held-out questions and captions per model (0: all)")
    understand.add_argument("--text-documents", type=int, default=100, help="held-out English documents (0: skip)")
    understand.add_argument("--text-corpus", default="default")
    understand.add_argument("--batch-size", type=int, default=16)
    understand.add_argument("--seed", type=int, default=0)
    understand.add_argument("--device", default="cpu")
    understand.set_defaults(run=cmd_understand)


def add_chameleon_command(commands) -> None:
    """`import-chameleon`, `export-chameleon`: transformers' checkpoints in and out."""
    for name, help_text, source in (
            ("import-chameleon", "convert a transformers Chameleon/Anole checkpoint (config.json + safetensors + "
             "tokenizer.json) into a unified_lm checkpoint with its tokenizer in OUT/tokenizer",
             "the checkpoint directory (as from huggingface, e.g. chameleon-7b)"),
            ("export-chameleon", "write a unified_lm run as a directory ChameleonForConditionalGeneration loads",
             "unified_lm run or checkpoint directory")):
        chameleon = commands.add_parser(name, help=help_text)
        chameleon.add_argument("source", help=source)
        chameleon.add_argument("out", help="output directory")
        chameleon.add_argument("--dtype", choices=("keep", "float32", "bfloat16"), default="keep",
                               help="cast the weights (default: keep the source's)")
        if name == "import-chameleon":
            chameleon.add_argument("--meta-vqgan", help="Meta's VQGAN weights (vqgan.ckpt or .safetensors): adds "
                                   "the picture decoder transformers' checkpoint lacks")
        else:
            chameleon.add_argument("--tokenizer", help="vqtok run whose encoder and codebook go under "
                                   "model.vqmodel (default: an imported checkpoint's own)")
        chameleon.set_defaults(run=cmd_chameleon)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from runkit.commands import failed

    try:
        return args.run(args)
    except (ValueError, OSError, KeyError, MemoryError, RuntimeError) as err:
        return failed(err, args.verbose)


if __name__ == "__main__":
    sys.exit(main())

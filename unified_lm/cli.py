"""The `unified-lm` command: build the vocabulary, generate the embedded world corpus, pack training data.

    unified-lm vocab   --tokenizer VQRUN --text default [--text MORE.txt] [--world DIR] --text-vocab-size 4000 --out VOCAB
    unified-lm world   --out DIR [--scenes 2000] [--seed 0] [--image-size 64]
    unified-lm prepare DOCS.jsonl [...] --vocab VOCAB --out PACKED [--tokens STORE ...] [--tokenizer VQRUN]
                       [--seq-len 512] [--train-on all|text|image] [--split train] [--text-documents N]

Training is `deepspeed scripts/train_unified.py` (see its --help).
Exit status: 0 success, 2 bad arguments, configuration or input (the message names the file or field).
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys


def cmd_vocab(args) -> int:
    from .text_corpus import read_texts
    from .vocab import build_vocabulary

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
        from .world import world_texts

        # world captions first and in full: the quickstart corpus's own words must become single pieces
        sources.insert(0, world_texts(args.world, split="train"))  # held-out texts stay unseen
    texts = itertools.chain.from_iterable(sources)
    vocab = build_vocabulary(args.out, None if args.spm_model else texts, args.text_vocab_size, codebook_size,
                             tokenizer, args.spm_model)
    print(json.dumps({k: v for k, v in vocab.describe().items() if k != "tokenizer"} | {"out": args.out}))
    return 0


def cmd_world(args) -> int:
    from .world import generate_world

    summary = generate_world(args.out, num_scenes=args.scenes, seed=args.seed, image_size=args.image_size,
                             force=args.force)
    print(json.dumps({"out": str(summary.out_dir), "documents": summary.num_documents, "images": summary.num_images,
                      "kinds": summary.kind_counts, "splits": summary.split_counts}))
    return 0


def cmd_prepare(args) -> int:
    from .prepare import PrepareSettings, prepare

    settings = PrepareSettings(seq_len=args.seq_len, default_train_on=args.train_on, split=args.split, seed=args.seed,
                               rows_per_shard=args.rows_per_shard, text_corpus=args.text_corpus,
                               text_documents=args.text_documents, image_resolution=args.image_resolution)
    info = prepare(args.documents, args.vocab, args.out, settings, stores=args.tokens or [],
                   tokenizer=args.tokenizer, device=args.device)
    keys = ("rows", "seq_len", "documents", "documents_by_train_on", "tokens", "target_tokens", "image_target_tokens",
            "padding_tokens", "vocab_size")
    print(json.dumps({key: info[key] for key in keys} | {"out": args.out}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unified-lm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)

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

    world = commands.add_parser("world", help="generate the procedural captioned world corpus")
    world.add_argument("--out", required=True)
    world.add_argument("--scenes", type=int, default=2000)
    world.add_argument("--seed", type=int, default=0)
    world.add_argument("--image-size", type=int, default=64)
    world.add_argument("--force", action="store_true", help="regenerate even if OUT holds a different world")
    world.set_defaults(run=cmd_world)

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
    prepare.add_argument("--seed", type=int, default=0, help="document order")
    prepare.add_argument("--rows-per-shard", type=int, default=8192)
    prepare.add_argument("--device", default="cpu", help="for --tokenizer encoding")
    prepare.set_defaults(run=cmd_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

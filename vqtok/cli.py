"""The `vqtok` command: train, encode, decode, eval.

    vqtok train  --config small [--data DIR[@RES] ...] [--steps N] --out RUN
    vqtok encode IMAGES --ckpt RUN --out TOKENS
    vqtok decode TOKENS --ckpt RUN --out DIR
    vqtok eval   --ckpt RUN [--data DIR | --labels LABELS.jsonl] [--resolution PX]
    vqtok convert-chameleon --out RUN [--hf HF_DIR] [--meta vqgan.ckpt] [--resolution 512]
                 Chameleon's tokenizer (transformers' ChameleonVQVAE and/or Meta's VQGAN with its decoder) -> RUN

Multi-process: launch the same command under torchrun (`torchrun --nproc_per_node N -m vqtok.cli encode ...`)
or the deepspeed launcher; each process takes its share.
Exit status: 0 success, 1 some input files could not be encoded (listed), 2 bad arguments, configuration or input
(one line naming the file or field; -v adds the traceback), including input that needs more memory than there is.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from runkit.commands import failed

log = logging.getLogger("vqtok")


def cmd_train(args) -> int:
    from runkit.distributed import setup_distributed
    from runkit.files import atomic_write_text
    from runkit.runs import RunDirectory
    from runkit.typed_config import parse_overrides

    from .config import load_config
    from .data import check_crop_fits, resolve_image_paths, resolve_sources
    from .losses import build_lpips
    from .train import Trainer

    config = load_config(args.config)
    overrides = parse_overrides(args.set or [])
    if args.steps is not None:
        overrides["train.steps"] = args.steps
    if args.batch_size is not None:
        overrides["train.batch_size"] = args.batch_size
    if args.lpips_weights:
        overrides["loss.lpips_weights"] = args.lpips_weights
    config = config.with_overrides(overrides).validate() if overrides else config
    sources = resolve_sources(args.data, "train")
    check_crop_fits(sources, config.train.crop_size)  # before any process group or model is built
    if args.eval_data or args.data is None:
        sample_paths = resolve_image_paths(args.eval_data, "heldout")
    else:  # the first images of each source in turn (one source: its first 6, as before)
        sample_paths = [s.paths[i] for i in range(6) for s in sources if i < len(s.paths)][:6]
    context = setup_distributed(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lpips_model = None
    if config.loss.perceptual_weight > 0:
        lpips_model = build_lpips(config.loss.lpips_net, config.loss.lpips_weights)
    if args.restart and context.is_main:
        RunDirectory(out).restart(files=("replicas.json",), folders=("samples",))
    context.barrier()
    trainer = Trainer(config, out, sources, sample_paths, context, lpips_model)
    if trainer.resume():
        log.info("resuming at step %d of %d", trainer.step, config.train.steps)
    if trainer.step >= config.train.steps:
        log.info("%s already trained for %d steps; nothing to do", out, trainer.step)
        return 0
    if context.is_main:
        atomic_write_text(out / "config.json", config.to_json())
    final = trainer.train()
    if context.is_main:
        print(json.dumps(final))
    return 0


def cmd_encode(args) -> int:
    from .encode import encode_images

    summary = encode_images(args.images, args.ckpt, args.out, batch_size=args.batch_size, device=args.device,
                            num_workers=args.workers, progress=not args.quiet, resolution=args.resolution)
    if summary.rank != 0:  # rank 0 reports for everyone (its failure list is read from the merged manifest)
        return 1 if summary.failures else 0
    for failure in summary.failures:
        print(f"FAILED {failure['source']}: {failure['reason']}", file=sys.stderr)
    print(json.dumps({"encoded": summary.encoded, "skipped_already_encoded": summary.skipped,
                      "failed": len(summary.failures), "images_in_store": summary.total_in_store,
                      "seconds": round(summary.seconds, 3), "images_per_second": round(summary.images_per_second, 3)}))
    return 1 if summary.failures else 0


def cmd_decode(args) -> int:
    from .encode import decode_store

    written = decode_store(args.tokens, args.ckpt, args.out, batch_size=args.batch_size, device=args.device,
                           allow_other_tokenizer=args.allow_other_tokenizer, progress=not args.quiet)
    print(json.dumps({"written": written, "out": str(args.out)}))
    return 0


def cmd_eval(args) -> int:
    from .evaluate import evaluate

    result = evaluate(args.ckpt, args.data, batch_size=args.batch_size, device=args.device,
                      lpips_weights=args.lpips_weights, labels=args.labels, resolution=args.resolution)
    text = json.dumps(result, indent=2)
    if args.json_out:
        from runkit.files import atomic_write_text

        atomic_write_text(args.json_out, text + "\n")
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vqtok", description="VQ image tokenizer: train, encode, decode, eval.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_command in (add_train_command, add_encode_command, add_decode_command, add_eval_command,
                        add_convert_chameleon_command):
        add_command(sub)
    return parser


def add_train_command(sub) -> None:
    """`train`: a tokenizer from image folders."""
    train = sub.add_parser("train", help="train a tokenizer")
    train.add_argument("--config", default="small", help="preset (chameleon, small, tiny) or JSON file")
    train.add_argument("--data", action="append", metavar="DIR[@RES]",
                       help="image folder (recursive) or file; repeat for several sources, each getting an equal share "
                            "of the samples; DIR@RES crops DIR's images after resizing their shorter side to exactly "
                            "RES px (no scale jitter; RES >= train.crop_size), for images encoded at that size; "
                            "default: the embedded photo set")
    train.add_argument("--eval-data", help="images for the periodic reconstruction grids")
    train.add_argument("--steps", type=int)
    train.add_argument("--batch-size", type=int, help="per-process batch size")
    train.add_argument("--out", required=True, help="run directory (resumed if it holds a checkpoint)")
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, e.g. train.lr=3e-4")
    train.add_argument("--lpips-weights", help="LPIPS trunk state dict (torchvision format)")
    train.add_argument("--restart", action="store_true", help="delete the checkpoints, log and samples in --out and start from step 0")
    train.add_argument("--device")
    train.set_defaults(func=cmd_train)


def add_encode_command(sub) -> None:
    """`encode`: images -> a token store."""
    encode = sub.add_parser("encode", help="images -> token store")
    encode.add_argument("images", help="image folder (recursive) or one image")
    encode.add_argument("--ckpt", required=True, help="tokenizer run or checkpoint directory")
    encode.add_argument("--out", required=True, help="token store directory (resumed if it exists)")
    encode.add_argument("--batch-size", type=int, default=16)
    encode.add_argument("--workers", type=int, default=0, help="image-decoding worker processes")
    encode.add_argument("--resolution", type=int, help="square size in pixels to encode at (default: the tokenizer's)")
    encode.add_argument("--device")
    encode.add_argument("--quiet", action="store_true")
    encode.set_defaults(func=cmd_encode)


def add_decode_command(sub) -> None:
    """`decode`: a token store -> PNGs."""
    decode = sub.add_parser("decode", help="token store -> PNGs")
    decode.add_argument("tokens", help="token store directory")
    decode.add_argument("--ckpt", required=True)
    decode.add_argument("--out", required=True)
    decode.add_argument("--batch-size", type=int, default=16)
    decode.add_argument("--allow-other-tokenizer", action="store_true",
                        help="decode even if the store was written by different tokenizer weights")
    decode.add_argument("--device")
    decode.add_argument("--quiet", action="store_true")
    decode.set_defaults(func=cmd_decode)


def add_eval_command(sub) -> None:
    """`eval`: reconstruction, usage and code stability."""
    evaluate = sub.add_parser("eval", help="PSNR / SSIM / codebook usage / code stability / LPIPS on held-out images")
    evaluate.add_argument("--ckpt", required=True)
    evaluate.add_argument("--data", help="image folder; default: the embedded held-out photos")
    evaluate.add_argument("--labels", help="region labels JSONL ({\"image\": PATH, \"cells\": [[LABEL, ...], ...]} per "
                                           "picture, e.g. WORLD/labels.jsonl): evaluates its pictures and adds "
                                           "H(code | content) and H(content | code)")
    evaluate.add_argument("--resolution", type=int, help="square size in pixels to encode at (default: the tokenizer's)")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--lpips-weights")
    evaluate.add_argument("--json-out", help="also write the metrics JSON here")
    evaluate.add_argument("--device")
    evaluate.set_defaults(func=cmd_eval)


def add_convert_chameleon_command(sub) -> None:
    """`convert-chameleon`: Chameleon's image tokenizer -> a vqtok checkpoint."""
    convert = sub.add_parser("convert-chameleon", help="Chameleon's image tokenizer -> a vqtok checkpoint")
    convert.add_argument("--hf", help="transformers Chameleon checkpoint directory (encoder + codebook)")
    convert.add_argument("--meta", help="Meta's VQGAN weights, vqgan.ckpt or .safetensors (encoder, codebook, decoder)")
    convert.add_argument("--resolution", type=int, help="picture side the tokenizer expects (default: the checkpoint's, 512)")
    convert.add_argument("--out", required=True)
    convert.set_defaults(func=cmd_convert_chameleon)


def cmd_convert_chameleon(args) -> int:
    from .chameleon import convert

    directory = convert(args.out, hf=args.hf, meta=args.meta, resolution=args.resolution)
    print(json.dumps({"out": args.out, "checkpoint": str(directory)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    from runkit.distributed import teardown_distributed

    try:
        return args.func(args)
    except (ValueError, OSError, MemoryError, RuntimeError) as err:
        return failed(err, args.verbose, f"vqtok {args.command}: ")
    finally:
        teardown_distributed()


if __name__ == "__main__":
    sys.exit(main())

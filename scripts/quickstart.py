"""The whole loop on the embedded default data, measured: tokenizer -> tokens -> unified model -> samples -> report.

    bash scripts/quickstart.sh                               # = setup + python scripts/quickstart.py (CPU, ~16 min)
    python scripts/quickstart.py --preset cpu-long           # the same loop with a longer CPU budget
    python scripts/quickstart.py --preset gpu                # the same loop, scaled up for one or more GPUs
    python scripts/quickstart.py --redo lm                   # redo the unified model and every stage after it

Stages (each prints the command it runs; a re-run reuses what is finished; --redo STAGE redoes that stage and the
ones after it, --redo all everything):
  world     unified-lm world --out OUT/world                 procedural captioned world with a held-out split
  photos    the embedded photos (scikit-image's bundled photographs) -> OUT/photos/{train,heldout}
  tokenizer vqtok train --data OUT/photos/train --data OUT/tokenizer_data@SIZE   (photos + training-split world
            pictures at their native size) -> OUT/tokenizer
  encode    vqtok encode OUT/world/images --resolution SIZE -> OUT/world_tokens
  vocab     unified-lm vocab (sentencepiece on the world's training texts + English Wikipedia) -> OUT/vocab
  prepare   unified-lm prepare OUT/world/documents.jsonl --split train --text-documents N -> OUT/packed
  lm        deepspeed --num_gpus P scripts/train_unified.py (ZeRO-2; P processes: 2 on CPU) -> OUT/lm
  sample    unified-lm sample on held-out prompts: interleaved stories, text -> picture, questions
            -> OUT/samples/<mode>/index.html
  eval      unified-lm eval -> OUT/eval/eval.json and OUT/eval/index.html: THE REPORT (open it in a browser)
  encoder   unified-lm encoder train (ViT + text tower, InfoNCE) on the world's training captions -> OUT/encoder
            (in the background, one thread, while the model is sampled and evaluated)
  stage1    the continuous path, stage 1: OUT/lm frozen, the image encoder frozen, the MLP adapter trained on
            captions (pictures as pixels: unified-lm prepare --encoder) -> OUT/lm_stage1
  stage2    stage 2: adapter + language model on questions and captions with English text mixed in
            -> OUT/lm_continuous; and the same data, steps and starting model with pictures as discrete codes
            -> OUT/lm_discrete (the side-by-side baseline)
  understand unified-lm understand: questions (incl. reading the small written word) and captions through both
            paths, and held-out English perplexity -> OUT/understanding; the report gains the comparison
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import torch  # noqa: E402

from runkit.distributed import free_port  # noqa: E402
from unified_lm.cli import main as unified_lm  # noqa: E402
from vqtok.cli import main as vqtok  # noqa: E402
from vqtok.data import default_photo_paths  # noqa: E402

STAGES = ("world", "photos", "tokenizer", "encode", "vocab", "prepare", "lm", "sample", "eval", "encoder", "stage1",
          "stage2", "understand")
OUTPUTS = {"world": ["world"], "photos": ["photos"], "tokenizer": ["tokenizer", "tokenizer_data"],
           "encode": ["world_tokens"], "vocab": ["vocab"], "prepare": ["packed"], "lm": ["lm"],
           "sample": ["samples"], "eval": ["eval"], "encoder": ["encoder"],
           "stage1": ["packed_captions", "lm_stage1"],
           "stage2": ["packed_understanding_continuous", "packed_understanding_discrete", "lm_continuous",
                      "lm_discrete"],
           "understand": ["understanding"]}


@dataclass
class Preset:
    """Everything that changes between the CPU quickstart and a scaled-up run of the same loop."""
    scenes: int = 9000  # world documents, each kind's last 10% held out
    # weighted toward what the report scores hardest (drawing the asked-for picture); ~200 held-out documents a kind
    world_mix: str = "text_to_image=0.35,image_to_text=0.2,qa=0.2,story=0.25"
    image_size: int = 48  # world pictures, pixels: 3x3 cells of 16 px, 6x6 = 36 tokens with the f8 tokenizer
    tokenizer_config: str = "small"
    tokenizer_steps: int = 2000
    world_share: int = 3  # the world's pictures get 3 of every 4 tokenizer training samples, the photos 1
    # Codes that are a function of the picture (docs/benchmarks.md, "Tokenizer codes a model can learn"): each 8 px
    # patch encoded on its own (cells are 16 px, so 2x2 codes each, aligned); an autoencoder warm-up before
    # quantizing, then k-means++ on the trained latents and no dead-code revival (revival re-seeds codes on the
    # commonest content and splits it between near-equal codes). Narrow (16 base channels) so it gets its steps in.
    # Measured on this world (docs/benchmarks.md): 1,500 steps with 600 of warm-up left the checker's ceiling at
    # 52-57% (colour not yet learned when k-means ran); 2,000 with 800 reached 96%.
    tokenizer_set: list[str] = field(default_factory=lambda: [
        "model.base_channels=16", "model.num_groups=4", "train.crop_size=48", "train.lr=1e-3", "loss.l2_weight=1.0",
        "quantizer.codebook_size=1024", "model.encoder_context=patch", "train.quantizer_warmup_steps=800",
        "quantizer.dead_code_threshold=0"])
    text_vocab_size: int = 2000
    text_documents: int = 300  # English Wikipedia documents mixed into training (held-out ones are the last ones)
    seq_len: int = 512
    lm_model: str = "small"
    lm_steps: int = 600
    # 2 sequences per process, 2 processes: 2,048 tokens a step. Measured: at 4,096 tokens a step the model needs
    # about twice the tokens before it starts drawing what the caption asks (docs/benchmarks.md).
    lm_set: list[str] = field(default_factory=lambda: [
        "train.micro_batch_size=2", "train.warmup_steps=20", "train.lr=2e-3", "train.log_every=10",
        "train.checkpoint_every=100"])
    processes: int = 2  # DeepSpeed processes (CPU: gloo; GPU: one per device)
    deepspeed_config: str = "zero2.json"
    device: str = "cpu"
    eval_count: int = 0  # held-out documents per world task (0: all)
    eval_stories: int = 0
    eval_text_documents: int = 100
    samples: int = 4  # prompts per sampling mode
    # the continuous encoder-adapter path and its discrete-token baseline (understanding)
    encoder_preset: str = "small"
    encoder_steps: int = 300  # 0: the preset's (520); 300 fits beside the eval (zero-shot colour+shape 46.5% vs 91.9%)
    # InfoNCE, not SigLIP, here: at this 2-minute CPU budget it reached 94% zero-shot colour+shape against
    # SigLIP's 56-59% (docs/benchmarks.md); SigLIP stays the encoder's default loss
    encoder_loss: str = "infonce"
    stage1_steps: int = 30
    stage2_steps: int = 60
    stage_set: list[str] = field(default_factory=lambda: [
        "train.micro_batch_size=4", "train.warmup_steps=10", "train.lr=1e-3", "train.log_every=10",
        "train.checkpoint_every=30"])
    understanding_text_documents: int = 100  # English documents mixed into stage 2 (both paths)


PRESETS = {
    "cpu": Preset(),
    # the same data and tokenizer, the unified model 3x longer (measured: text -> picture colour+shape 88.2% at
    # CFG 3, whole scene 53.3%, stories' later steps 78.4%; docs/benchmarks.md), longer understanding stages
    "cpu-long": Preset(lm_steps=1800, encoder_steps=0, stage1_steps=100, stage2_steps=300),
    # the reduced loop the test suite runs end to end (tiny models, a small world; numbers are not meaningful)
    "ci": Preset(scenes=300, image_size=24, tokenizer_config="tiny", tokenizer_steps=4,
                 tokenizer_set=["train.crop_size=24", "quantizer.codebook_size=64"], text_vocab_size=400, text_documents=20, seq_len=256,
                 lm_model="tiny", lm_steps=4, lm_set=["model.max_seq_len=1024", "train.micro_batch_size=2", "train.log_every=2",
                                                      "train.checkpoint_every=4"],
                 eval_count=4, eval_stories=2, eval_text_documents=4, samples=2, encoder_preset="tiny",
                 encoder_steps=4, stage1_steps=2, stage2_steps=2,
                 stage_set=["model.max_seq_len=1024", "train.micro_batch_size=2", "train.log_every=1",
                            "train.checkpoint_every=2"], understanding_text_documents=4),
    # one node of GPUs (not run here: no GPU was lent while this was written); 96 px pictures, 12x12 tokens (cells
    # of 32 px: 4x4 codes each)
    "gpu": Preset(scenes=100_000, image_size=96, tokenizer_steps=20_000,
                  tokenizer_set=["train.crop_size=96", "train.batch_size=32", "quantizer.codebook_size=8192",
                                 "model.encoder_context=patch", "train.quantizer_warmup_steps=5000",
                                 "quantizer.dead_code_threshold=0"],
                  text_vocab_size=8000, text_documents=8000, seq_len=2048, lm_model="350m", lm_steps=20_000,
                  lm_set=["train.micro_batch_size=8", "train.log_every=50", "train.checkpoint_every=1000"],
                  processes=0, device="cuda", eval_count=500, eval_stories=200, eval_text_documents=500, samples=16,
                  encoder_preset="base", stage1_steps=1000, stage2_steps=5000,
                  stage_set=["train.micro_batch_size=8", "train.lr=3e-4", "train.log_every=50",
                             "train.checkpoint_every=1000"], understanding_text_documents=2000),
}


def stage(name: str, argv: list, command=vqtok, program: str = "vqtok") -> None:
    print(f"\n== {name}: {program} {' '.join(map(str, argv))}", flush=True)
    start = time.perf_counter()
    code = command([str(a) for a in argv])
    if code not in (0, 1):
        sys.exit(f"stage {name} failed with exit status {code}")
    print(f"== {name} done in {time.perf_counter() - start:.1f}s", flush=True)


def launch(name: str, argv: list) -> None:
    """Run a launcher command (the deepspeed launcher starts its own processes)."""
    argv = [str(a) for a in argv]
    print(f"\n== {name}: {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    code = subprocess.run(argv).returncode
    if code != 0:
        sys.exit(f"stage {name} failed with exit status {code}")
    print(f"== {name} done in {time.perf_counter() - start:.1f}s", flush=True)


def copy_photos(out: Path) -> None:
    for split in ("train", "heldout"):
        folder = out / "photos" / split
        folder.mkdir(parents=True, exist_ok=True)
        for path in default_photo_paths(split):
            if not (folder / path.name).exists():
                shutil.copy2(path, folder / path.name)


def link_training_pictures(world: Path, folder: Path) -> Path:
    """The world's training-split pictures in their own folder (hard links), so the tokenizer never sees a
    held-out picture."""
    folder.mkdir(parents=True, exist_ok=True)
    for line in (world / "documents.jsonl").read_text().splitlines():
        document = json.loads(line)
        if document["split"] != "train":
            continue
        for segment in document["segments"]:
            if "image" in segment and not (folder / Path(segment["image"]).name).exists():
                source = world / segment["image"]
                try:
                    os.link(source, folder / source.name)
                except OSError:  # another filesystem
                    shutil.copy2(source, folder / source.name)
    return folder


def held_out_prompts(world: Path, count: int) -> dict[str, list[dict]]:
    """Prompts from documents the model never trained on: story openings (interleaved), captions (image) and
    questions about pictures (understanding)."""
    prompts: dict[str, list[dict]] = {"interleaved": [], "image": [], "understanding": []}
    for line in (world / "documents.jsonl").read_text().splitlines():
        document = json.loads(line)
        if document["split"] != "heldout":
            continue
        segments = document["segments"]
        if document["kind"] == "story":
            prompts["interleaved"].append({"segments": [segments[0]]})
        elif document["kind"] == "text_to_image":
            prompts["image"].append({"segments": [segments[0]]})
        elif document["kind"] == "qa":
            question = segments[1]["text"].split(" Answer:")[0] + " Answer:"
            prompts["understanding"].append({"segments": [{"image": str((world / segments[0]["image"]).resolve())},
                                                          {"text": question}]})
    return {mode: items[-count:] for mode, items in prompts.items()}  # the eval takes the first ones


def sample_documents(out: Path, preset: Preset) -> dict[str, Path]:
    pages = {}
    settings = {"interleaved": ["--max-new-tokens", 4 * (preset.image_size // 8) ** 2 + 160, "--max-images", 3],
                "image": ["--cfg", "2way", "--cfg-scale", 3.0, "--max-new-tokens", 4096], "understanding": ["--max-new-tokens", 24]}
    for mode, prompts in held_out_prompts(out / "world", preset.samples).items():
        folder = out / "samples" / mode
        if (folder / "index.html").exists():
            pages[mode] = folder / "index.html"
            continue
        file = out / "samples" / f"prompts-{mode}.jsonl"
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text("".join(json.dumps(p) + "\n" for p in prompts))
        stage(f"sample {mode}", ["sample", "--ckpt", out / "lm", "--tokenizer", out / "tokenizer", "--prompts", file,
                                 "--mode", mode, "--out", folder, "--device", preset.device, *settings[mode]],
              unified_lm, "unified-lm")
        pages[mode] = folder / "index.html"
    return pages


def trained_steps(run: Path) -> int:
    """Optimizer steps of the run's newest complete checkpoint (0 when there is none)."""
    latest = run / "latest"
    meta = run / "checkpoints" / latest.read_text().strip() / "meta.json" if latest.is_file() else None
    return json.loads(meta.read_text())["step"] if meta is not None and meta.is_file() else 0


class Job:
    """A stage running in the background (one CPU thread) beside the stages in the foreground; its output goes to
    OUT/logs/NAME.log. On 2 cores two one-thread jobs finish sooner than the same two jobs one after the other
    with two threads each: these models are too small to keep two threads busy."""

    def __init__(self, out: Path, name: str, argv: list):
        argv = [str(a) for a in argv]
        self.name, self.log = name, out / "logs" / f"{name}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        print(f"\n== {name} (in the background, output in {self.log}): {' '.join(argv)}", flush=True)
        self.start = time.perf_counter()
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "OMP_NUM_THREADS": "1"})

    def wait(self) -> None:
        if self.process.wait() != 0:
            sys.exit(f"stage {self.name} failed with exit status {self.process.returncode}; the end of {self.log}:\n"
                     + "\n".join(self.log.read_text().splitlines()[-20:]))
        print(f"== {self.name} done in {time.perf_counter() - self.start:.1f}s", flush=True)


def train_lm(out: Path, preset: Preset, name: str = "lm", data: str = "packed", steps: int | None = None,
             settings: list[str] | None = None, background: bool = False) -> Job | None:
    """DeepSpeed's launcher starts the processes (gloo on CPU, one per GPU on CUDA); resumes an interrupted run.
    The understanding stages reuse it with their own data, steps and --set overrides (staged training); with
    `background`, one process on one CPU thread, returned as a Job."""
    steps = preset.lm_steps if steps is None else steps
    if trained_steps(out / name) >= steps:
        return None
    deepspeed = Path(sys.executable).with_name("deepspeed")
    resume = ["--resume"] if (out / name / "latest").exists() else []
    processes = preset.processes if not background or preset.device != "cpu" else 1
    processes = ["--num_gpus", processes] if processes else []  # 0: every GPU of the node
    lm_set = [arg for item in (preset.lm_set if settings is None else settings) for arg in ("--set", item)]
    argv = [deepspeed, *processes, "--master_port", free_port(), REPO / "scripts" / "train_unified.py",
            "--model", preset.lm_model, "--data", out / data, "--out", out / name, "--device", preset.device,
            "--deepspeed_config", REPO / "configs" / "deepspeed" / preset.deepspeed_config,
            "--steps", steps, *lm_set, *resume]
    if background and preset.device == "cpu":
        return Job(out, name, argv)
    launch(name, argv)
    return None


def prepare_once(out: Path, name: str, arguments: list) -> None:
    if not (out / name / "dataset.json").exists():
        stage(f"prepare {name}", ["prepare", out / "world" / "documents.jsonl", "--vocab", out / "vocab", "--split",
                                  "train", "--out", out / name, *arguments], unified_lm, "unified-lm")


def start_encoder(out: Path, preset: Preset) -> Job | None:
    """The contrastive image encoder of the continuous path needs only the world and the vocabulary: it trains in
    the background while the language model is sampled and evaluated."""
    if (out / "encoder" / "zero_shot.json").exists():
        return None
    encoder_steps = ["--steps", preset.encoder_steps] if preset.encoder_steps else []
    resume = ["--resume"] if (out / "encoder" / "latest").exists() else []
    argv = ["encoder", "train", "--world", out / "world", "--vocab", out / "vocab", "--out", out / "encoder",
            "--preset", preset.encoder_preset, "--loss", preset.encoder_loss, "--device", preset.device,
            *encoder_steps, *resume]
    if preset.device != "cpu":
        stage("encoder", argv, unified_lm, "unified-lm")
        return None
    return Job(out, "encoder", [Path(sys.executable).with_name("unified-lm"), *argv])


def understanding_stages(out: Path, preset: Preset, encoder: Job | None) -> None:
    """The continuous path (LLaVA's two stages, from the quickstart's language model) and its discrete baseline:
    stage 2 of both paths trains the same documents for the same steps from the same model (with 36 pictures
    tokens either way: 6x6 codes, or 6x6 encoder patches), so only the way pictures enter differs. Stage 1 and
    the discrete stage 2 run side by side, one CPU thread each."""
    seq_len = ["--seq-len", preset.seq_len]
    mixed = ["--kinds", "qa,image_to_text", "--text-documents", preset.understanding_text_documents, *seq_len]
    prepare_once(out, "packed_understanding_discrete", [*mixed, "--tokens", out / "world_tokens"])
    settings = preset.stage_set + [f"train.init_from={out / 'lm'}"]
    discrete = train_lm(out, preset, "lm_discrete", "packed_understanding_discrete", preset.stage2_steps, settings,
                        background=True)
    if encoder is not None:
        encoder.wait()
    prepare_once(out, "packed_captions", ["--kinds", "image_to_text", "--encoder", out / "encoder", *seq_len])
    prepare_once(out, "packed_understanding_continuous", [*mixed, "--encoder", out / "encoder"])
    stage1 = train_lm(out, preset, "lm_stage1", "packed_captions", preset.stage1_steps,
                      settings + [f"train.encoder_run={out / 'encoder'}", "train.freeze_lm=true"], background=True)
    for job in (stage1, discrete):
        if job is not None:
            job.wait()
    train_lm(out, preset, "lm_continuous", "packed_understanding_continuous", preset.stage2_steps,
             preset.stage_set + [f"train.init_from={out / 'lm_stage1'}"])
    if not (out / "understanding" / "understanding.json").exists():
        stage("understand", ["understand", "--discrete", f"before={out / 'lm'}", "--discrete",
                             f"discrete={out / 'lm_discrete'}", "--continuous", f"continuous={out / 'lm_continuous'}",
                             "--world", out / "world", "--tokenizer", out / "tokenizer", "--out",
                             out / "understanding", "--count", preset.eval_count, "--text-documents",
                             preset.eval_text_documents, "--device", preset.device], unified_lm, "unified-lm")


def run(out: Path, preset: Preset) -> dict:
    start = time.perf_counter()
    stage("world", ["world", "--out", out / "world", "--scenes", preset.scenes, "--seed", 0, "--image-size",
                    preset.image_size, "--mix", preset.world_mix], unified_lm, "unified-lm")
    print("\n== photos: embedded default set -> " + str(out / "photos"), flush=True)
    copy_photos(out)
    world_pictures = link_training_pictures(out / "world", out / "tokenizer_data")
    tokenizer_set = [arg for item in preset.tokenizer_set for arg in ("--set", item)]
    # sources share the samples equally; the world is named `world_share` times (the photos once), since the
    # world's pictures are what the unified model draws
    world_sources = ["--data", f"{world_pictures}@{preset.image_size}"] * preset.world_share
    stage("tokenizer", ["train", "--config", preset.tokenizer_config, "--data", out / "photos" / "train",
                        *world_sources, "--eval-data", out / "photos" / "heldout",
                        "--steps", preset.tokenizer_steps, "--out", out / "tokenizer", "--device", preset.device,
                        *tokenizer_set])
    stage("encode", ["encode", out / "world" / "images", "--ckpt", out / "tokenizer", "--out", out / "world_tokens",
                     "--resolution", preset.image_size, "--device", preset.device, "--batch-size", 128, "--quiet"])
    if not (out / "vocab" / "vocab.json").exists():
        stage("vocab", ["vocab", "--tokenizer", out / "tokenizer", "--world", out / "world", "--text", "default",
                        "--text-vocab-size", preset.text_vocab_size, "--out", out / "vocab"], unified_lm, "unified-lm")
    if not (out / "packed" / "dataset.json").exists():
        stage("prepare", ["prepare", out / "world" / "documents.jsonl", "--vocab", out / "vocab", "--tokens",
                          out / "world_tokens", "--split", "train", "--seq-len", preset.seq_len, "--text-documents",
                          preset.text_documents, "--out", out / "packed"], unified_lm, "unified-lm")
    train_lm(out, preset)
    encoder = start_encoder(out, preset)
    threads = torch.get_num_threads()
    if encoder is not None:  # leave the other core to it
        torch.set_num_threads(1)
    pages = sample_documents(out, preset)
    if not (out / "eval" / "index.html").exists():
        stage("eval", ["eval", "--ckpt", out / "lm", "--tokenizer", out / "tokenizer", "--world", out / "world",
                       "--photos", out / "photos" / "heldout", "--out", out / "eval", "--count", preset.eval_count,
                       "--stories", preset.eval_stories, "--text-documents", preset.eval_text_documents,
                       "--device", preset.device], unified_lm, "unified-lm")
    torch.set_num_threads(threads)
    understanding_stages(out, preset, encoder)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "pages": pages}


def finish_report(out: Path, preset_name: str, preset: Preset, seconds: float, pages: dict[str, Path]) -> Path:
    """Rewrite the report with the run's facts (wall time, peak memory, preset) and links to the samples."""
    from unified_lm.eval.report import write_report

    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    itself = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    facts = {"preset": f"{preset_name}: {json.dumps(asdict(preset))}",
             "this run's wall time": f"{seconds / 60:.1f} min (stages reused from an earlier run take no time)",
             "peak memory (largest process)": f"{max(children, itself) / 1024:.0f} MB"}
    return write_report(out / "eval", out / "lm", title="Quickstart: what each stage learned",
                        links={f"sampled {mode} documents": page for mode, page in pages.items()}, facts=facts,
                        understanding=out / "understanding" / "understanding.json")


def same_preset(recorded: dict, current: dict) -> bool:
    """Equal settings; a run recorded before newer stages (and their settings) existed is extended by them."""
    return set(recorded) <= set(current) and all(current[key] == value for key, value in recorded.items())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/quickstart")
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--redo", choices=("all",) + STAGES, help="redo this stage and every stage after it")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    preset = PRESETS[args.preset]
    recorded = out / "preset.json"
    if args.redo:
        first = 0 if args.redo == "all" else STAGES.index(args.redo)
        for name in STAGES[first:]:
            for folder in OUTPUTS[name]:
                shutil.rmtree(out / folder, ignore_errors=True)
    elif recorded.exists() and not same_preset(json.loads(recorded.read_text()),
                                               {"name": args.preset, **asdict(preset)}):
        sys.exit(f"{out} was made with another preset ({recorded}); use another --out or --redo all")
    out.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps({"name": args.preset, **asdict(preset)}, indent=1) + "\n")
    result = run(out, preset)
    page = finish_report(out, args.preset, preset, result["seconds"], result["pages"])
    report = json.loads((out / "eval" / "eval.json").read_text())["results"]
    print(f"\nquickstart finished in {result['seconds'] / 60:.1f} min")
    for task, label in (("text_to_image", "text -> picture colour+shape"), ("interleaved", "stories colour+shape"),
                        ("image_to_text", "picture -> caption colour+shape"), ("qa", "questions answered")):
        key = "accuracy" if task == "qa" else "colour_shape"
        row = report[task]
        before = row.get("before_training", {}).get(key)
        print(f"  {label}: {100 * row['trained'][key]:.1f}% (before training "
              f"{'-' if before is None else f'{100 * before:.1f}%'}, chance {100 * row['chance'][key]:.1f}%)")
    if "text" in report:
        text = report["text"]
        print(f"  held-out English perplexity: {text['trained']['perplexity']:.1f} (before training "
              f"{text.get('before_training', {}).get('perplexity', float('nan')):.1f}, uniform {text['chance']['perplexity']:.0f})")
    photos = report.get("tokenizer_photos", {}).get("trained")
    if photos:
        print(f"  tokenizer, held-out photos: PSNR {photos['psnr']:.2f} dB, SSIM {photos['ssim']:.3f}")
    understanding = out / "understanding" / "understanding.md"
    if understanding.exists():
        print("\n  picture understanding, discrete codes vs continuous features (held-out world):\n  "
              + understanding.read_text().strip().replace("\n", "\n  "))
    print(f"\n  THE REPORT (open in a browser): {page}\n  summary picture: {out / 'eval' / 'report.png'}")
    for mode, sample_page in result["pages"].items():
        print(f"  sampled {mode} documents: {sample_page}")


if __name__ == "__main__":
    main()

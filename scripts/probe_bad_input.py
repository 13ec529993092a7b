"""Bad-input probes (docs/reliability.md): each feeds one crafted input to a command and reports what happened.

    python scripts/probe_bad_input.py --work /tmp/probes --out after.jsonl        # this checkout
    PYTHONPATH=/tmp/before python scripts/probe_bad_input.py --work /tmp/probes-before --out before.jsonl
    python scripts/probe_bad_input.py --table before.jsonl after.jsonl           # the markdown table

Every command runs as a child process of the code under test (`python -m vqtok.cli`, `python -m unified_lm.cli`
and the `scripts/train_unified.py` beside the imported `unified_lm`), so the same script probes another checkout
through PYTHONPATH. It first builds small fixtures (~2 minutes on 2 CPU cores): a world corpus, a `tiny` tokenizer,
its token store, a vocabulary, a packed dataset and a 2-step `tiny` unified model. Each result records the exit
status, the last line of stderr (a traceback shows as its final line, marked TRACEBACK) and what the probe
checks afterwards (files outside OUT, the old dataset still loading, ...). Children run with a 6 GB address-space
limit, so a config that asks for the moon fails with MemoryError instead of waking the OOM killer.
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
from pathlib import Path

MEMORY_LIMIT = 6 << 30


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


class Probes:
    def __init__(self, work: Path):
        import unified_lm

        self.work = work
        self.code = Path(unified_lm.__file__).resolve().parents[1]
        self.train_script = self.code / "scripts" / "train_unified.py"
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", str(self.code))}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
            self.env.pop(key, None)

    # -- running commands ---------------------------------------------------------------------------------------
    def run(self, *argv, timeout: int = 600) -> dict:
        start = time.perf_counter()
        try:
            result = subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, env=self.env,
                                    timeout=timeout, preexec_fn=_limit_memory, errors="replace")
        except subprocess.TimeoutExpired:
            return {"exit": "timeout", "stderr": "", "seconds": timeout}
        return {"exit": result.returncode, "stderr": result.stderr, "stdout": result.stdout,
                "seconds": round(time.perf_counter() - start, 1)}

    def vqtok(self, *argv, **kw) -> dict:
        return self.run("-m", "vqtok.cli", *argv, **kw)

    def lm(self, *argv, **kw) -> dict:
        return self.run("-m", "unified_lm.cli", *argv, **kw)

    def train(self, *argv, **kw) -> dict:
        return self.run(self.train_script, "--model", "tiny", "--set", "train.warmup_steps=1", *argv, **kw)

    def must(self, result: dict, what: str) -> dict:
        if result["exit"] != 0:
            raise SystemExit(f"fixture {what} failed ({result['exit']}):\n{result['stderr'][-3000:]}")
        return result

    # -- fixtures -----------------------------------------------------------------------------------------------
    def fixtures(self) -> None:
        w = self.work
        if (w / "fixtures.done").exists():
            return
        shutil.rmtree(w, ignore_errors=True)
        w.mkdir(parents=True)
        self.must(self.lm("world", "--out", w / "world", "--scenes", 40, "--image-size", 32), "world")
        self.must(self.vqtok("train", "--config", "tiny", "--data", w / "world" / "images", "--steps", 2, "--out",
                             w / "tok", "--set", "train.checkpoint_every=2"), "tokenizer")
        self.must(self.vqtok("encode", w / "world" / "images", "--ckpt", w / "tok", "--out", w / "tokens", "--quiet"),
                  "encode")
        (w / "corpus.txt").write_text("".join(f"a small red circle and a large blue square number {i}.\n" for i in range(200)))
        self.must(self.lm("vocab", "--tokenizer", w / "tok", "--world", w / "world", "--text", w / "corpus.txt",
                          "--text-vocab-size", 300, "--out", w / "vocab"), "vocab")
        self.must(self.lm("prepare", w / "world" / "documents.jsonl", "--vocab", w / "vocab", "--tokens", w / "tokens",
                          "--seq-len", 64, "--out", w / "packed"), "prepare")
        self.must(self.train("--data", w / "packed", "--out", w / "lm", "--steps", 2, "--set", "train.checkpoint_every=1",
                             "--set", "train.micro_batch_size=2"), "train")
        (w / "fixtures.done").write_text("ok")

    def copy(self, name: str, to: str) -> Path:
        target = self.work / "cases" / to
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(self.work / name, target)
        return target

    def case(self, name: str) -> Path:
        path = self.work / "cases" / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    # -- the probes ---------------------------------------------------------------------------------------------
    def p1_prepare_keeps_old_dataset(self) -> dict:
        w, case = self.work, self.case("p1")
        out = self.copy("packed", "p1/packed")
        docs = case / "docs.jsonl"
        docs.write_text(json.dumps({"segments": [{"text": "x"}, {"image_ref": {"store": str(w / "tokens"),
                                                                                "source": "no-such.png"}}]}) + "\n")
        result = self.lm("prepare", docs, "--vocab", w / "vocab", "--out", out)
        check = self.run("-c", f"from unified_lm.data.packing import PackedDataset; print(len(PackedDataset({str(out)!r})))")
        result["after"] = (f"old dataset loads: {check['exit'] == 0}; "
                           f"leftovers: {sorted(p.name for p in out.iterdir() if 'building' in p.name) or 'none'}")
        return result

    def p2_decode_confined(self) -> dict:
        case = self.case("p2")
        store = self.copy("tokens", "p2/store")
        index = next((store / "shards").glob("*.index.jsonl"))
        rows = [json.loads(line) for line in index.read_text().splitlines()]
        rows[0]["source"] = "../escaped/evil.png"
        rows[1]["source"] = str(case / "absolute" / "evil.png")
        index.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (store / "manifest.json").unlink()
        result = self.vqtok("decode", store, "--ckpt", self.work / "tok", "--out", case / "out", "--quiet")
        escaped = [str(p.relative_to(case)) for p in case.rglob("*.png") if "out" not in p.relative_to(case).parts[:1]]
        result["after"] = f"PNGs outside OUT: {escaped or 'none'}"
        return result

    def p3a_huge_layer_count(self) -> dict:
        ckpt = self.copy("lm/checkpoints/step_00000002", "p3a/ckpt")
        config = json.loads((ckpt / "config.json").read_text())
        config["model"]["n_layers"] = 10**6
        (ckpt / "config.json").write_text(json.dumps(config))
        return self.lm("sample", "--ckpt", ckpt, "--prompt", "a", "--mode", "text", "--max-new-tokens", 2,
                       "--out", self.case("p3a-out"), timeout=300)

    def p3b_huge_codebook(self) -> dict:
        case = self.case("p3b")
        vocab = self.copy("vocab", "p3b/vocab")
        info = json.loads((vocab / "vocab.json").read_text())
        info["codebook_size"] = 10**12
        (vocab / "vocab.json").write_text(json.dumps(info))
        docs = case / "docs.jsonl"
        docs.write_text(json.dumps({"segments": [{"text": "hello"}]}) + "\n")
        return self.lm("prepare", docs, "--vocab", vocab, "--out", case / "out", timeout=300)

    def p4_corrupt_safetensors(self) -> dict:
        tok = self.copy("tok", "p4/tok")
        weights = next(tok.rglob("model.safetensors"))
        weights.write_bytes(weights.read_bytes()[:1000])
        return self.vqtok("encode", self.work / "world" / "images", "--ckpt", tok, "--out", self.case("p4-out"))

    def _resume(self, run: Path, *extra: str, steps: int = 3) -> dict:
        result = self.train("--data", self.work / "packed", "--out", run, "--steps", steps, "--resume",
                            "--set", "train.micro_batch_size=2", *extra)
        said = [line for line in result["stdout"].splitlines() if "resum" in line or "warning" in line]
        result["after"] = f"stdout: {' / '.join(said) or 'nothing about resuming'}"
        return result

    def p5a_latest_names_missing(self) -> dict:
        run = self.copy("lm", "p5a")
        (run / "latest").write_text("step_00000009\n")
        return self._resume(run)

    def p5b_truncated_deepspeed_state(self) -> dict:
        run = self.copy("lm", "p5b")
        for state in (run / "checkpoints" / "step_00000002").glob("*.pt"):
            state.write_bytes(state.read_bytes()[:200])
        return self._resume(run)

    def p5b2_truncated_deepspeed_state_trusted(self) -> dict:
        run = self.copy("lm", "p5b2")
        for state in (run / "checkpoints" / "step_00000002").glob("*.pt"):
            state.write_bytes(state.read_bytes()[:200])
        return self._resume(run, "--resume-trust-deepspeed")

    def p5c_prune_keeps_good(self) -> dict:
        run = self.copy("lm", "p5c")
        (run / "checkpoints" / "step_00000002" / "model.safetensors").unlink()
        result = self._resume(run, "--set", "train.checkpoint_every=1", steps=4)
        kept = sorted(p.name + ("" if (p / "model.safetensors").is_file() else " (no model.safetensors)")
                      for p in (run / "checkpoints").iterdir() if p.is_dir())
        result["after"] += f"; checkpoints left: {kept}"
        return result

    def _pickle_case(self, name: str) -> tuple[Path, Path]:
        run = self.copy("lm", name)
        marker = self.work / "cases" / f"{name}-PWNED"
        marker.unlink(missing_ok=True)
        state = run / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt"
        self.must(self.run("-c", "import os, sys, torch\n"
                                 "class Boom:\n"
                                 "    def __reduce__(self):\n"
                                 f"        return (os.system, ('touch {marker}',))\n"
                                 f"torch.save({{'module': Boom()}}, {str(state)!r})\n"), "pickle")
        return run, marker

    def p6_crafted_pickle(self) -> dict:
        run, marker = self._pickle_case("p6")
        result = self._resume(run)
        result["after"] += f"; os.system ran: {marker.exists()}"
        return result

    def p6b_trusted_pickle_not_yours(self) -> dict:
        run = self.copy("lm", "p6b")
        for state in (run / "checkpoints").glob("*/*.pt"):
            state.chmod(0o664)  # writable by the group: someone else could have replaced it
        return self._resume(run, "--resume-trust-deepspeed")

    def _prepare_line(self, name: str, line: bytes) -> dict:
        case = self.case(name)
        docs = case / "docs.jsonl"
        docs.write_bytes(b'{"segments": [{"text": "fine"}]}\n' + line + b"\n")
        result = self.lm("prepare", docs, "--vocab", self.work / "vocab", "--out", case / "out", "--seq-len", 64)
        result["after"] = f"dataset written: {(case / 'out' / 'dataset.json').exists()}"
        return result

    def p7_unknown_segment_key(self) -> dict:
        return self._prepare_line("p7", b'{"segments": [{"text": "secret", "Loss": false}]}')

    def p8a_lone_surrogate(self) -> dict:
        return self._prepare_line("p8a", b'{"segments": [{"text": "a \\ud800 b"}]}')

    def p8b_invalid_utf8(self) -> dict:
        return self._prepare_line("p8b", b'{"segments": [{"text": "caf\xe9"}]}')

    def p9_cfg_scale_nan(self) -> dict:
        out = self.case("p9")
        result = self.lm("sample", "--ckpt", self.work / "lm", "--tokenizer", self.work / "tok", "--prompt", "a",
                         "--mode", "image", "--cfg", "2way", "--cfg-scale", "nan", "--out", out, "--image-grid", "2x2")
        if (out / "sample-000.json").is_file():
            codes = json.loads((out / "sample-000.json").read_text())["segments"][0]["codes"]
            result["after"] = f"picture codes drawn: {codes}"
        return result

    def p10a_deepspeed_json_not_object(self) -> dict:
        case = self.case("p10a")
        (case / "ds.json").write_text("[1, 2]")
        return self.train("--data", self.work / "packed", "--out", case / "run", "--steps", 1,
                          "--deepspeed_config", case / "ds.json")

    def p10b_out_of_range_ids(self) -> dict:
        packed = self.copy("packed", "p10b/packed")
        shard = next((packed / "shards").glob("*.tokens"))
        import numpy as np

        data = np.fromfile(shard, dtype="<u2")
        data[:] = 65535
        data.tofile(shard)
        return self.train("--data", packed, "--out", self.case("p10b-run"), "--steps", 1)

    def p10c_vqtok_given_lm_run(self) -> dict:
        return self.vqtok("encode", self.work / "world" / "images", "--ckpt", self.work / "lm", "--out", self.case("p10c"))

    def p10d_zero_stage_string(self) -> dict:
        case = self.case("p10d")
        (case / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": "2"}}))
        return self.train("--data", self.work / "packed", "--out", case / "run", "--steps", 1,
                          "--deepspeed_config", case / "ds.json")


PROBES = {
    "p1_prepare_keeps_old_dataset": ("1", "prepare a bad document into an existing dataset", "unified-lm prepare bad.jsonl --out PACKED (PACKED holds a good dataset)"),
    "p2_decode_confined": ("2", "token store index names ../escaped/evil.png and an absolute path", "vqtok decode STORE --out OUT"),
    "p3a_huge_layer_count": ("3", "checkpoint config.json with n_layers=10**6", "unified-lm sample --ckpt CKPT (6 GB limit)"),
    "p3b_huge_codebook": ("3", "vocab.json with codebook_size=10**12", "unified-lm prepare --vocab VOCAB"),
    "p4_corrupt_safetensors": ("4", "model.safetensors cut to 1000 bytes", "vqtok encode --ckpt TOK"),
    "p5a_latest_names_missing": ("5", "RUN/latest names step_00000009, which does not exist", "train_unified.py --resume"),
    "p5b_truncated_deepspeed_state": ("5", "latest checkpoint's DeepSpeed *.pt cut to 200 bytes", "train_unified.py --resume"),
    "p5b2_truncated_deepspeed_state_trusted": ("5", "the same, resuming from DeepSpeed's state", "train_unified.py --resume-trust-deepspeed"),
    "p5c_prune_keeps_good": ("5", "latest step_2 lost model.safetensors; keep_checkpoints=2", "train_unified.py --resume --steps 4"),
    "p6_crafted_pickle": ("6", "mp_rank_00_model_states.pt replaced by a pickle that calls os.system", "train_unified.py --resume"),
    "p6b_trusted_pickle_not_yours": ("6", "DeepSpeed's *.pt files writable by the group", "train_unified.py --resume-trust-deepspeed"),
    "p7_unknown_segment_key": ("7", "segment {\"text\": ..., \"Loss\": false}", "unified-lm prepare"),
    "p8a_lone_surrogate": ("8", "text holding a lone surrogate \\ud800", "unified-lm prepare"),
    "p8b_invalid_utf8": ("8", "documents line with the byte 0xe9 (Latin-1, not UTF-8)", "unified-lm prepare"),
    "p9_cfg_scale_nan": ("9", "--cfg-scale nan", "unified-lm sample --mode image --cfg 2way"),
    "p10a_deepspeed_json_not_object": ("10", "DeepSpeed config [1, 2]", "train_unified.py --deepspeed_config"),
    "p10b_out_of_range_ids": ("10", "token shard rewritten (same size) with id 65535", "train_unified.py --data PACKED"),
    "p10c_vqtok_given_lm_run": ("10", "--ckpt pointing at a unified_lm run", "vqtok encode --ckpt LMRUN"),
    "p10d_zero_stage_string": ("10", "zero_optimization.stage \"2\" (a string)", "train_unified.py --deepspeed_config"),
}


def summarize(result: dict) -> str:
    lines = [line for line in result.get("stderr", "").splitlines() if line.strip()]
    traceback = any("Traceback (most recent call last)" in line for line in lines)
    errorish = [line for line in lines if "error" in line.lower() or "Error" in line or "resum" in line]
    last = (errorish or lines or [""])[-1].strip()
    if len(last) > 220:
        last = last[:217] + "..."
    text = f"exit {result['exit']}" + (" TRACEBACK" if traceback else "") + (f": {last}" if last else "")
    if result.get("after"):
        text += f" [{result['after']}]"
    return text.replace("|", "\\|")


def table(before: Path, after: Path) -> str:
    rows = {}
    for label, path in (("before", before), ("after", after)):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            rows.setdefault(record["probe"], {})[label] = record["summary"]
    out = ["| item | probe | command | before | after |", "|---|---|---|---|---|"]
    for name, (item, what, command) in PROBES.items():
        if name in rows:
            out.append(f"| {item} | {what} | `{command}` | {rows[name].get('before', '-')} | {rows[name].get('after', '-')} |")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/chameleon-probes"))
    parser.add_argument("--out", type=Path, help="append one JSON line per probe here")
    parser.add_argument("--only", help="comma-separated probe name prefixes (e.g. p1,p5)")
    parser.add_argument("--table", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.table:
        print(table(*args.table))
        return 0
    probes = Probes(args.work)
    print(f"probing {probes.code} in {args.work}", file=sys.stderr)
    probes.fixtures()
    for name in PROBES:
        if args.only and not any(name.startswith(prefix) for prefix in args.only.split(",")):
            continue
        result = getattr(probes, name)()
        record = {"probe": name, "summary": summarize(result), "exit": result["exit"], "seconds": result.get("seconds")}
        print(json.dumps(record), flush=True)
        if args.out:
            with open(args.out, "a") as handle:
                handle.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

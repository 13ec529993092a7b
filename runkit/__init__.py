"""runkit: the run plumbing every trainer and loader shares, below vqtok and unified_lm.

    files.py         atomic writes, confined names, JSON / JSONL / safetensors reading with errors naming the file
    typed_config.py  dataclass configs from JSON with typed checks, `--set a.b=v` overrides, presets or files
    runs.py          run directories: `latest` (both formats), the JSONL log and its truncation on resume (one rule
                     for a torn last line), --resume / --restart
    checkpoints.py   checkpoint directories: staged writes committed with files.json manifests and `latest`,
                     fallback to the newest complete one, pruning, weights checked by name and shape before
                     loading, optimizer state without pickles
    schedules.py     lr schedules: linear warm-up, then cosine / exponential (Chameleon's) / constant
    batches.py       batches as a pure function of the step: seeded per-epoch permutations walked by position
    optim.py         optimizer parameter groups: weight decay on weight matrices, none on norms and biases
    distributed.py   torch.distributed set-up for torchrun / the deepspeed launcher, free ports
    commands.py      `error_line`: a failure at a command's boundary as one line

It imports nothing of this project: vqtok, unified_lm and the scripts build on it.
"""

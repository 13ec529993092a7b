"""runkit: the run plumbing every trainer and loader shares, below vqtok and unified_lm.

    files.py         atomic writes, confined names, JSON / JSONL / safetensors reading with errors naming the file
    typed_config.py  dataclass configs from JSON with typed checks, `--set a.b=v` overrides, presets or files
    checkpoints.py   checkpoint directories: `latest`, files.json manifests, fallback to the newest complete one,
                     pruning, weights checked by name and shape before loading, optimizer state without pickles
    distributed.py   torch.distributed set-up for torchrun / the deepspeed launcher, free ports

It imports nothing of this project: vqtok, unified_lm and the scripts build on it.
"""

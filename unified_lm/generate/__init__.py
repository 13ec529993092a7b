"""Sampling: prompts in, interleaved text + picture documents out (KV-cached decoding under a modality state
machine, logits processors, classifier-free guidance), and rendering them to PNG / Markdown / HTML / JSON."""

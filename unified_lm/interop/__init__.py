"""Interop with the field's checkpoints: transformers' Chameleon / Anole in and out, Meta's VQGAN."""

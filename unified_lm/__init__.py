"""unified_lm: one decoder-only transformer over one stream of text and image tokens (Chameleon-style).

Subpackages, lowest first (ARCHITECTURE.md has the picture and the import rule):

    tokens/    vocab.py (joint ids: sentencepiece pieces, specials <bos> <eos> <pad> <boi> <eoi> <image>, image
               codes), documents.py (interleaved JSONL -> ids + loss masks), text_corpus.py (English from packages)
    world/     corpus.py (the embedded procedural captioned world with exact ground truth), check.py (reads a
               picture back into facts)
    vision/    encoder.py (the ViT picture tower), contrastive.py (+ text tower, SigLIP / InfoNCE: losses.py)
    data/      packing.py (packed, sharded, memory-mapped rows), prepare.py (`unified-lm prepare`), pictures.py
               (pixels beside the rows for the continuous path)
    model/     config.py (typed configs, presets tiny .. 7b), transformer.py (RMSNorm, SwiGLU, RoPE, GQA, QK-norm,
               z-loss, norm reordering), adapter.py (encoder -> <image> placeholders), checkpoint.py (the files)
    generate/  segments.py (prompts and outputs), sampling.py (settings, logit arithmetic), processors.py (logits
               processors, token selector, stopping rules), sampler.py (the KV-cached loop over them),
               decode_step.py (CUDA graph step), prompts.py, render.py
    train/     trainer.py (DeepSpeed ZeRO 0-3, exact resume; `deepspeed scripts/train_unified.py`), initial.py (the
               weights training starts from), resume.py, encoder.py (the contrastive encoder), plot.py
    eval/      evaluate.py (`unified-lm eval`), understanding.py (`unified-lm understand`), report.py
    interop/   chameleon.py (transformers' Chameleon / Anole in and out), random_checkpoint.py (offline fixtures)
    cli.py     `unified-lm vocab | world | prepare | sample | eval | encoder | understand | import/export-chameleon`

It reads vqtok's token stores and checkpoints; vqtok never imports this package.
"""

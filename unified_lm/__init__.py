"""unified_lm: one decoder-only transformer over one stream of text and image tokens (Chameleon-style).

    vocab.py        joint ids: sentencepiece BPE pieces, specials (<bos> <eos> <pad> <boi> <eoi> <image>), image codes
    world.py        the embedded procedural captioned world (documents + exact ground truth)
    text_corpus.py  real English text from installed packages (Wikipedia lead sections)
    documents.py    interleaved documents (JSONL) -> token ids + loss masks
    packing.py      packed, sharded, memory-mapped training rows; deterministic batches
    prepare.py      `unified-lm prepare`: documents + vqtok token stores -> packed dataset
    config.py       typed model/training configs and presets (tiny, small, 350m, 7b)
    model.py        the transformer (RMSNorm, SwiGLU, RoPE, GQA, QK-norm, z-loss, norm reordering)
    train.py        DeepSpeed training (ZeRO 1/2/3), checkpoints, exact resume, stability logs
    checkpoint.py   the shareable checkpoint files (safetensors + config + vocab + meta) and loading them
    sampling.py     sampling settings and per-step logit arithmetic (top-k/top-p, penalty, guidance, draws)
    sampler.py      KV-cached interleaved generation under the text/picture state machine, with CFG
    processors.py   the sampler step's parts: logits processors (CFG, modality mask, penalty, top-k/top-p), token
                    selector, stopping rules; add a processor with generate(processors=[...])
    prompts.py      prompt files and prompt pictures (encoded by vqtok) for `unified-lm sample`
    render.py       sampled documents -> PNG, Markdown, self-contained HTML, JSON
    vision.py       the contrastive image encoder: ViT picture tower + text tower (encoder_train.py trains it with
                    contrastive.py's SigLIP / InfoNCE losses and measures zero-shot accuracy)
    adapter.py      the continuous path inside the model: image encoder -> pooling -> MLP into <image> placeholders
    pictures.py     pixels beside the packed rows for the continuous path (`prepare --encoder`)
    understanding.py  `unified-lm understand`: questions and captions through discrete codes vs continuous features
    cli.py          `unified-lm vocab | world | prepare | sample | eval | encoder | understand`; training is
                    `deepspeed scripts/train_unified.py` (staged: train.init_from, encoder_run, freeze_lm)

It reads vqtok's token stores and checkpoints; vqtok never imports this package.
"""

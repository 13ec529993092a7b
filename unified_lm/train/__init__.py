"""Training: the unified model under DeepSpeed (trainer.py; `deepspeed scripts/train_unified.py`), exact resume,
the contrastive image encoder (encoder.py), and the training curves."""

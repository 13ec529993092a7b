"""Training: the unified model under DeepSpeed (trainer.py; launch.py is the command `deepspeed
scripts/train_unified.py` runs), exact resume, the contrastive image encoder (encoder.py), and the training curves.
The run plumbing they share with vqtok's trainer (run directories, schedules, resume) is runkit's."""

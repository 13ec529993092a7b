"""The unified transformer and what describes it: configs and presets, the continuous-path adapter, the shareable
checkpoint files. It never imports vqtok, the contrastive model or its losses, or anything about training."""

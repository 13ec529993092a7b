"""The image encoder: the ViT picture tower (encoder.py, what the model's adapter reads) and the contrastive model
that trains it beside a text tower (contrastive.py, losses.py)."""

"""The weights training starts from: a seeded fresh model, then staged training's starting points (the image
encoder of train.encoder_run, the weights of train.init_from). Training builds its model here, and evaluation's
before-training baseline rebuilds the same weights."""
from __future__ import annotations

import torch

from runkit.checkpoints import check_weight_shapes
from runkit.files import load_tensors, tensor_shapes
from unified_lm.model.checkpoint import resolve_run
from unified_lm.model.config import UnifiedConfig
from unified_lm.model.transformer import UnifiedTransformer
from unified_lm.vision.contrastive import load_encoder


def untrained_model(config: UnifiedConfig) -> UnifiedTransformer:
    """The weights training starts from (torch seeded with train.seed, then the model built, as the trainer does
    for ZeRO stages 0-2): the before-training baseline of `unified-lm eval`. With train.encoder_run /
    train.init_from, those weights are loaded over the fresh ones (see `load_initial_weights`)."""
    torch.manual_seed(config.train.seed)
    model = UnifiedTransformer(config.model)
    load_initial_weights(model, config)
    return model


PICTURE_PREFIX = "picture_adapter."


def load_initial_weights(model: UnifiedTransformer, config: UnifiedConfig) -> None:
    """Staged training's starting point: the image encoder of train.encoder_run (an `unified-lm encoder train`
    run), then every weight of train.init_from (a unified_lm run or checkpoint: the language model, which must
    match this config's, and its picture adapter and encoder when it has them). Names and shapes are checked."""
    train = config.train
    if train.encoder_run:
        if model.picture_adapter is None:
            raise ValueError("train.encoder_run is set but model.picture.encoder is empty")
        encoder, _ = load_encoder(train.encoder_run)
        model.picture_adapter.encoder.load_state_dict(encoder.vision.state_dict())
    if train.init_from:
        file = resolve_run(train.init_from) / "model.safetensors"
        expected = model.state_dict()
        has_picture = any(name.startswith(PICTURE_PREFIX) for name in tensor_shapes(file))
        if not has_picture:  # a plain language model starts this one: its picture path stays fresh
            expected = {name: t for name, t in expected.items() if not name.startswith(PICTURE_PREFIX)}
        check_weight_shapes(expected, file, "train.init_from")
        model.load_state_dict(load_tensors(file), strict=False)

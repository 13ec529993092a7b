"""The model inside DeepSpeed's engine: built (partitioned under ZeRO-3), registered, wrapped; and one micro-batch's
call through it.

The model (unified_lm.model) imports nothing of DeepSpeed; what ZeRO-3 needs of it is applied here, from outside:
- partitioned construction: under `deepspeed.zero.Init` each rank holds only its shards from the first allocation,
  so a model too large for one device never exists whole. Torch is seeded first, so every rank draws the same
  initial weights; the model initialises them through `Module.apply`, which zero.Init gathers around the call.
- the tied output head: with tied embeddings the head reads `embed.weight` inside its own call, outside the
  embedding's; registered as an external parameter of the head, ZeRO-3 gathers it there too (forward and backward).
- parameter counts read `ds_numel`: a partitioned parameter's own numel is that of its shard.
Nothing is needed for RoPE: its cos/sin tables are a per-device cache of the model, neither parameters nor
buffers, so nothing partitions, casts or saves them.

DeepSpeed is imported inside the functions: the trainer imports it first (`import_deepspeed`, which keeps it from
building its shared-memory op on CPU), and importing this module costs nothing without it.
"""
from __future__ import annotations

import torch

from unified_lm.data.packing import Batch
from unified_lm.model.config import UnifiedConfig
from unified_lm.model.transformer import ModelOutput, Pictures, Targets, UnifiedTransformer
from unified_lm.train.initial import untrained_model


def zero_stage(ds_config: dict) -> int:
    return ds_config.get("zero_optimization", {}).get("stage", 0)


def build_model(config: UnifiedConfig, ds_config: dict) -> UnifiedTransformer:
    """The model a run starts from, with the same initial weights on every rank (torch seeded with train.seed).

    ZeRO stages 0-2: `untrained_model` (train.encoder_run / train.init_from loaded over the fresh weights).
    Stage 3: built partitioned under zero.Init, then registered (`register_for_zero3`); whole-weight loading is
    refused there."""
    if zero_stage(ds_config) != 3:
        return untrained_model(config)
    if config.train.init_from or config.train.encoder_run:
        raise ValueError("train.init_from / train.encoder_run load whole weights: use ZeRO stage 0-2")
    import deepspeed

    torch.manual_seed(config.train.seed)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = UnifiedTransformer(config.model)
    register_for_zero3(model)
    return model


def register_for_zero3(model: UnifiedTransformer) -> None:
    """Tell ZeRO-3 what the model reads outside the owning module's call: the tied embedding matrix, which the
    output head reads (see `OutputHead`). Registered, it is gathered with the head's own parameters, forward and
    backward, as DeepSpeed documents for such reads; unregistered, the engine would only find it at the read, by
    its fallback that gathers a partitioned parameter on access, which its prefetching does not plan for."""
    import deepspeed

    if model.lm_head.weight is None:  # tied
        deepspeed.zero.register_external_parameter(model.lm_head, model.embed.weight)


def parameter_count(model: torch.nn.Module) -> int:
    """Every parameter's full size, partitioned or not."""
    return sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())


def wrap(model: UnifiedTransformer, optimizer: torch.optim.Optimizer, lr_scheduler, ds_config: dict):
    """DeepSpeed's engine around the model (ZeRO, bf16, accumulation, clipping); `lr_scheduler` may be a function
    of the engine's wrapped optimizer (ZeRO regroups the parameters)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                           config=ds_config)
    return engine


def micro_batch_loss(model: torch.nn.Module, batch: Batch, denominator: float | None = None,
                     layer_stats: bool = False) -> ModelOutput:
    """The loss of a packed batch's targets through `model`: the engine while training (its forward, so ZeRO-3's
    hooks bracket the call), or a bare UnifiedTransformer. denominator: see `Targets`."""
    pictures = None if batch.picture_slots is None else Pictures(slots=batch.picture_slots, pixels=batch.pixels)
    return model(batch.inputs, document_ids=batch.document_ids, code_positions=batch.code_positions,
                 pictures=pictures,
                 targets=Targets(batch.targets, batch.loss_mask, batch.image_targets, denominator, layer_stats))

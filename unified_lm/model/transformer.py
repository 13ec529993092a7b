"""The unified decoder-only transformer: one stream of text and image tokens (Chameleon, arXiv:2405.09818).

A Llama-style block (RMSNorm, SwiGLU, RoPE, grouped-query attention) plus the stability measures of Chameleon
section 2.3, because text and image tokens compete through one softmax and mixed-modal training drifts into
slow norm growth and divergence:
- QK-norm: LayerNorm over head_dim applied to q and k (per-head affine weights) BEFORE RoPE;
- z-loss: z_loss_weight * log(Z)^2 per token on the softmax normaliser (1e-5);
- norm reordering (Chameleon-34B, Swin-style): h = x + norm(attn(x)); out = h + norm(ffn(h)),
  instead of the usual pre-norm h = x + attn(norm(x));
- dropout after attention and feed-forward (Chameleon-7B: 0.1).

Packed sequences: `document_ids` keeps attention inside each document and RoPE positions restart per document.
Beyond Chameleon: `image_positions` adds a learned embedding of each image code's place in its picture
(`code_positions`, from `Vocabulary.code_positions`), as DALL-E did for its image tokens; with 1-D RoPE alone a
model must count tokens since <boi> to know which part of the picture it is drawing.
Attention and the loss go through `kernels.attention.attention` and `kernels.linear_cross_entropy` so Triton
kernels replace them on CUDA without touching this file.

Interface: `model(tokens)` -> fp32 logits (B, T, V); `model(tokens, targets=Targets(...))` -> the training loss
(`ModelOutput`); `model.decode(...)` -> logits of new tokens through a `KVCache`. Packed documents
(`document_ids`), picture-code places (`code_positions`) and continuous pictures (`Pictures`, spliced in at the
`<image>` placeholders: the encoder-adapter path) are keywords of each. Nothing here imports DeepSpeed: what
ZeRO-3 needs of the model is applied from outside, in `unified_lm/train/engine.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.attention import (
    attention,
    cached_attention,
    cached_attention_mask,
    max_attention_logit,
)
from kernels.linear_cross_entropy import linear_cross_entropy
from unified_lm.model.adapter import PictureAdapter
from unified_lm.model.config import ModelConfig


@dataclass
class Pictures:
    """Continuous pictures at a batch's `<image>` placeholders, given one of two ways (never both):

    - as pixels: `slots` (B, T), picture * placeholders + patch at each placeholder (-1 elsewhere), and `pixels`
      (M, 3, S, S) in [-1, 1], which the model's picture adapter encodes (training, evaluation);
    - as embeddings: `mask` (B, T) bool at the placeholders and `embeddings` (N, dim), one row per placeholder in
      row-major order, already encoded (the sampler's prefill encodes its prompt pictures one at a time).
    """

    slots: torch.Tensor | None = None
    pixels: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None

    def __post_init__(self):
        as_pixels = self.slots is not None, self.pixels is not None
        as_embeddings = self.mask is not None, self.embeddings is not None
        if any(as_pixels) and any(as_embeddings):
            raise ValueError("Pictures come either as slots + pixels (encoded by the model) or as mask + embeddings "
                             "(already encoded), not both")
        if not (all(as_pixels) or all(as_embeddings)):
            raise ValueError("Pictures need slots and pixels together, or mask and embeddings together")


@dataclass
class Targets:
    """What the training loss scores: the next token at each input position, all (B, T) like the tokens."""

    ids: torch.Tensor
    mask: torch.Tensor | None = None  # which targets count (None: all)
    in_picture: torch.Tensor | None = None  # which targets are picture tokens, for the per-modality losses
    # the masked loss sum is divided by this (None: the mask's count); training passes a share of the whole step's
    # target count, so every target token weighs the same whatever micro-batch or rank it lands in
    denominator: float | None = None
    layer_stats: bool = False  # also measure each layer's max |q.k| logit and output RMS (ModelOutput.layer_stats)


@dataclass
class ModelOutput:
    """The training loss (`model(tokens, targets=...)`) and what the logs report about it."""

    loss: torch.Tensor  # scalar: masked sum of ce + z_loss_weight * log_z^2 over the denominator
    text_loss: torch.Tensor  # detached mean ce over non-image targets (NaN when there are none)
    image_loss: torch.Tensor  # detached mean ce over image targets
    z_loss: torch.Tensor  # detached mean z_loss_weight * log_z^2
    log_z: torch.Tensor  # detached mean log Z
    tokens: torch.Tensor  # number of loss tokens (text, image) as a (2,) tensor
    sums: torch.Tensor  # detached (5,): sums over loss tokens of loss, text ce, image ce, z term, log Z
    layer_stats: list[dict] = field(default_factory=list)  # per layer: max_qk_logit, output_rms (Targets.layer_stats)


@dataclass
class KVCache:
    """Preallocated keys and values for incremental decoding, one (B, n_kv_heads, capacity, head_dim) pair per layer.

    Rows of different prompt lengths are left-padded so every row writes the same slots; `key_valid` marks the
    slots that hold real tokens. `length` counts the slots written so far. Slots are not positions: with padding
    a cache may hold more slots than max_seq_len, while each row's RoPE positions (given to `decode`) must stay
    below it.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    key_valid: torch.Tensor  # (B, capacity) bool
    length: int = 0

    @classmethod
    def allocate(cls, config: ModelConfig, batch: int, capacity: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> KVCache:
        shape = (batch, config.n_kv_heads, capacity, config.head_dim)
        return cls([torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)],
                   [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)],
                   torch.zeros(batch, capacity, dtype=torch.bool, device=device))

    @property
    def capacity(self) -> int:
        return self.key_valid.shape[1]

    def head(self, rows: int) -> KVCache:
        """A view of the first `rows` rows sharing this cache's storage; its `length` is a copy (`advance` this
        cache by the slots a decode through the view took).

        The sampler decodes only the full-context rows while no guidance row has a token to take; the slots the
        other rows skip stay invalid (key_valid False) and are never attended to."""
        return KVCache([k[:rows] for k in self.keys], [v[:rows] for v in self.values], self.key_valid[:rows],
                       self.length)

    def advance(self, slots: int = 1) -> None:
        """Count `slots` more slots as written, for writes `decode` did not count here: a static-shape step (it
        writes at the slot it is given and leaves `length` to the caller) or a `head` view (its length is a copy)."""
        if self.length + slots > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} slots; {self.length} used, {slots} more requested")
        self.length += slots

    def restart_row(self, row: int, keep_slot: int) -> None:
        """Forget what row `row` has written except slot `keep_slot`: its next tokens attend to that slot and to
        what comes after, as if its context were that one token. The sampler restarts a guidance row's
        unconditional context at every picture this way, keeping its <bos>. Keys and values stay where they are
        (masked out; later tokens go to new slots), so the row's RoPE positions restart with the caller."""
        if not 0 <= keep_slot < self.length:
            raise ValueError(f"slot {keep_slot} is not written (the cache has {self.length} slots in use)")
        self.key_valid[row, : self.length] = False
        self.key_valid[row, keep_slot] = True

    def take_slots(self, valid: torch.Tensor,
                   slot: torch.Tensor | None = None) -> tuple[int | torch.Tensor, torch.Tensor]:
        """Slots for new tokens, `valid` (B, T) False at padding: the next T slots (`length` advances), or with
        `slot` (static shapes: T = 1) that one slot, `length` left to the caller. Returns the first slot and the
        mask (B, 1, T, S) of the slots each new token attends to."""
        length = valid.shape[1]
        if slot is not None:
            if length != 1:
                raise ValueError(f"static-shape decoding takes one token per row, got {length}")
            self.key_valid.index_copy_(1, slot.view(1), valid)
            return slot, cached_attention_mask(slot, 1, self.key_valid)
        start = self.length
        self.advance(length)
        self.key_valid[:, start : start + length] = valid
        return start, cached_attention_mask(start, length, self.key_valid[:, : start + length])


@dataclass
class LayerCache:
    """One layer's view of a KVCache while new tokens are written at `slot`; `mask` (B, 1, T, S) says which
    slots each new token attends to (built once per step, shared by every layer)."""

    keys: torch.Tensor
    values: torch.Tensor
    slot: int | torch.Tensor
    mask: torch.Tensor

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: (B, H_kv, T, D) -> the keys/values the new tokens attend over."""
        if isinstance(self.slot, torch.Tensor):  # static shapes (CUDA graphs): one token at a tensor slot, all slots
            self.keys.index_copy_(2, self.slot.view(1), k)
            self.values.index_copy_(2, self.slot.view(1), v)
            return self.keys, self.values
        end = self.slot + k.shape[2]
        self.keys[:, :, self.slot : end] = k
        self.values[:, :, self.slot : end] = v
        return self.keys[:, :, :end], self.values[:, :, :end]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # computed in fp32: bf16 mean-of-squares loses the small-norm signal Chameleon's stability relies on
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class HeadLayerNorm(nn.Module):
    """Chameleon's QK-norm: LayerNorm over head_dim, with a separate affine weight and bias per head."""

    def __init__(self, n_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(n_heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, H, D)
        normed = F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)
        return normed * self.weight + self.bias


def rope_table(head_dim: int, max_positions: int, theta: float,
               device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape (max_positions, head_dim / 2), fp32, computed in fp64 from integer positions.

    fp64 keeps far positions' angles accurate (in fp32 they are off by ~1e-4 rad at a few thousand tokens), and it
    is what every trained model saw, so it stays, although no wrapper casts this computation any more (it runs at
    the first forward, never inside zero.Init)."""
    frequencies = theta ** (-torch.arange(0, head_dim, 2, device=device).double() / head_dim)
    angles = torch.outer(torch.arange(max_positions, device=device).double(), frequencies)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, D); cos/sin: (B, T, D/2) already gathered at each token's position. Rotates pairs (i, i+D/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


def positions_in_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, T) position of each token inside its own document (0 at each start)."""
    length = document_ids.shape[1]
    index = torch.arange(length, device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start_index


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.o_proj.residual_projection = True  # depth-scaled init (see UnifiedTransformer._init_weights)
        qk_eps = config.qk_norm_eps or config.norm_eps
        self.q_norm = HeadLayerNorm(config.n_heads, config.head_dim, qk_eps) if config.qk_norm else None
        self.k_norm = HeadLayerNorm(config.n_kv_heads, config.head_dim, qk_eps) if config.qk_norm else None
        self.dropout = config.dropout

    def forward(self, x, cos, sin, document_ids, stats: dict | None = None, cache: LayerCache | None = None):
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(batch, length, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, length, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:  # before RoPE, as in Chameleon
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if stats is not None:
            stats["max_qk_logit"] = max_attention_logit(q.detach(), k.detach(), document_ids)
        if cache is None:
            out = attention(q, k, v, document_ids, self.dropout if self.training else 0.0)
        else:  # decoding: keys/values (after QK-norm and RoPE) go into the cache, queries see the whole cache
            keys, values = cache.append(k, v)
            out = cached_attention(q, keys, values, cache.mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.w2 = nn.Linear(config.hidden_dim, config.dim, bias=False)
        self.w2.residual_projection = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.norm_reordering = config.norm_reordering
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, document_ids, stats: dict | None = None, cache: LayerCache | None = None):
        if self.norm_reordering:  # Chameleon-34B: normalise each sub-layer's output, not its input
            h = x + self.dropout(self.attention_norm(self.attention(x, cos, sin, document_ids, stats, cache)))
            return h + self.dropout(self.ffn_norm(self.feed_forward(h)))
        h = x + self.dropout(self.attention(self.attention_norm(x), cos, sin, document_ids, stats, cache))
        return h + self.dropout(self.feed_forward(self.ffn_norm(h)))


class OutputHead(nn.Module):
    """Projection to the vocabulary: fp32 logits, or with targets the loss from the fused-loss dispatch point.

    The matrix is the head's own weight or, with tied embeddings, the embedding's: a tied head owns no parameter
    (the matrix keeps one name, embed.weight) and reads the weight of the embedding module the model hands it at
    each call. The weight is read inside this module's call, not in a bare matmul, because a sharded run gathers
    weights around module calls (ZeRO-3; unified_lm/train/engine.py registers the tied matrix with the head).
    """

    def __init__(self, dim: int, vocab_size: int, tied: bool):
        super().__init__()
        self.weight = None if tied else nn.Parameter(torch.empty(vocab_size, dim))

    def forward(self, x: torch.Tensor, embedding: nn.Embedding, targets: torch.Tensor | None = None,
                token_weights: torch.Tensor | None = None, z_loss_weight: float = 0.0):
        """x: (N, dim); embedding: the model's (a tied head's matrix). Without targets: logits (N, V) fp32. With
        targets (N,) and token_weights (N,): the fused loss sum_i w_i * (ce_i + z_loss_weight * log_z_i^2) and
        detached per-token ce, log_z, each (N,) fp32."""
        matrix = embedding.weight if self.weight is None else self.weight
        if targets is None:
            return F.linear(x, matrix).float()
        return linear_cross_entropy(x, matrix, targets, token_weights, z_loss_weight)


class UnifiedTransformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (from the vocabulary) before building the model")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = OutputHead(config.dim, config.vocab_size, tied=config.tied_embeddings)
        self.code_position_embed = nn.Embedding(config.image_positions, config.dim) if config.image_positions else None
        self.embed_dropout = nn.Dropout(config.dropout)
        # the continuous path: image encoder + MLP adapter whose features fill <image> placeholders
        self.picture_adapter = PictureAdapter(config.picture, config.dim) if config.picture.encoder else None
        # RoPE tables are a per-device cache, not buffers: `model.to(bfloat16)` (a bf16 engine, bf16 sampling) casts
        # buffers, and the tables must stay fp32; not being state, they are never saved, partitioned or cast
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.apply(self._init_weights)  # Module.apply: a sharded build (zero.Init) gathers each weight around it

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)) or (isinstance(module, OutputHead) and module.weight is not None):
            std = self.config.init_std
            if getattr(module, "residual_projection", False):  # GPT-2: scale residual projections by depth
                std /= math.sqrt(2 * self.config.n_layers)
            nn.init.normal_(module.weight, std=std)

    def rope(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope is None or self._rope[0].device != device:
            config = self.config
            self._rope = rope_table(config.head_dim, config.max_seq_len, config.rope_theta, device)
        return self._rope

    def embed_tokens(self, tokens: torch.Tensor, code_positions: torch.Tensor | None = None,
                     pictures: Pictures | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, T, dim). code_positions (B, T), each image code's index in its picture (-1 elsewhere;
        None: no codes), adds the image position embeddings; `pictures` replace the placeholders' embeddings."""
        splice = None if pictures is None else self.picture_embeddings(pictures)
        h = self.embed(tokens)
        if self.code_position_embed is not None and code_positions is not None:
            inside = (code_positions >= 0)[..., None].to(h.dtype)
            h = h + self.code_position_embed(code_positions.clamp(min=0)) * inside
        if splice is None:
            return h
        mask, embeddings = splice
        count = int(mask.sum())
        if embeddings.shape != (count, h.shape[-1]):
            raise ValueError(f"picture embeddings must have shape ({count}, {h.shape[-1]}) for {count} placeholder "
                             f"positions, got {tuple(embeddings.shape)}")
        return h.masked_scatter(mask[..., None], embeddings.to(h.dtype))

    def picture_embeddings(self, pictures: Pictures) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask (B, T), embeddings (N, dim)) for the placeholders: as given, or the picture adapter's features of
        the pixels, gathered at the slots."""
        if pictures.pixels is None:
            return pictures.mask, pictures.embeddings
        if self.picture_adapter is None:
            raise ValueError("the batch holds continuous pictures, but the model has no picture encoder "
                             "(set train.encoder_run, or load a checkpoint trained with one)")
        features = self.picture_adapter(pictures.pixels)  # (M, placeholders, dim)
        mask = pictures.slots >= 0
        return mask, features.reshape(-1, features.shape[-1])[pictures.slots[mask]]

    def forward(self, tokens: torch.Tensor, *, document_ids: torch.Tensor | None = None,
                code_positions: torch.Tensor | None = None, pictures: Pictures | None = None,
                targets: Targets | None = None) -> torch.Tensor | ModelOutput:
        """tokens (B, T) -> fp32 logits (B, T, V); given `targets`, the training loss instead (a `ModelOutput`).

        The loss is not computed from logits: the fused head (`kernels.linear_cross_entropy`) takes the hidden
        states and never holds all (B, T, V) of them. It stays one call because wrappers act on forward: DeepSpeed's
        engine calls it, and ZeRO-3's hooks gather and release the weights around it.
        document_ids (B, T): packed documents (None: one per row); attention stays inside each, RoPE restarts.
        code_positions: see `embed_tokens` (needed by models with image_positions whenever the tokens hold image
        codes). pictures: continuous pictures at the `<image>` placeholders.
        """
        batch, length = tokens.shape
        if length > self.config.max_seq_len:
            raise ValueError(f"sequence length {length} exceeds model max_seq_len {self.config.max_seq_len}")
        if document_ids is not None:
            positions = positions_in_documents(document_ids)
        else:
            positions = torch.arange(length, device=tokens.device).expand(batch, length)
        cos_table, sin_table = self.rope(tokens.device)
        cos, sin = cos_table[positions], sin_table[positions]
        x = self.embed_dropout(self.embed_tokens(tokens, code_positions, pictures))
        collect_stats = targets is not None and targets.layer_stats
        layer_stats = []
        for layer in self.layers:
            stats = {} if collect_stats else None
            x = layer(x, cos, sin, document_ids, stats)
            if stats is not None:
                stats["output_rms"] = x.detach().float().pow(2).mean().sqrt()
                layer_stats.append(stats)
        x = self.norm(x)
        if targets is None:
            return self.lm_head(x.reshape(batch * length, -1), self.embed).view(batch, length, -1)
        return self._loss(x, targets, layer_stats)

    def _loss(self, x: torch.Tensor, targets: Targets, layer_stats: list[dict]) -> ModelOutput:
        flat_targets = targets.ids.reshape(-1)
        mask = (torch.ones(flat_targets.shape, device=x.device) if targets.mask is None
                else targets.mask.reshape(-1).float())
        count = mask.sum().clamp(min=1.0)
        token_weights = mask / (count if targets.denominator is None else targets.denominator)
        # The loss (with its gradients) comes from the fused head; ce and log Z come back detached for the stats.
        loss, ce, log_z = self.lm_head(x.reshape(-1, x.shape[-1]), self.embed, flat_targets, token_weights,
                                       self.config.z_loss_weight)
        with torch.no_grad():
            z_term = self.config.z_loss_weight * log_z.pow(2)
            loss_sum = ((ce + z_term) * mask).sum()
            image = (torch.zeros_like(mask) if targets.in_picture is None
                     else targets.in_picture.reshape(-1).to(mask.dtype))
            image_mask, text_mask = mask * image, mask * (1 - image)
            sums = torch.stack([loss_sum, (ce * text_mask).sum(), (ce * image_mask).sum(),
                                (z_term * mask).sum(), (log_z * mask).sum()])
            text_count, image_count = text_mask.sum(), image_mask.sum()
            return ModelOutput(
                loss=loss,
                text_loss=sums[1] / text_count,  # NaN when there are no text targets
                image_loss=sums[2] / image_count,
                z_loss=sums[3] / count,
                log_z=sums[4] / count,
                tokens=torch.stack([text_count, image_count]),
                sums=sums,
                layer_stats=layer_stats,
            )

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, cache: KVCache, positions: torch.Tensor, valid: torch.Tensor | None = None,
               last_only: bool = False, slot: torch.Tensor | None = None, splice_mask: torch.Tensor | None = None,
               splice_embeddings: torch.Tensor | None = None, code_positions: torch.Tensor | None = None) -> torch.Tensor:
        """Incremental decoding: run `tokens` (B, T) through the model, appending their keys/values to `cache`.

        positions: (B, T) RoPE positions of the new tokens (a left-padded prompt's first real token is 0);
        valid: (B, T) bool, False for padding (default: all real). Returns fp32 logits (B, T, V), equal to a full
        forward over each row's real tokens (tests check 1e-5 in fp32); with `last_only`, (B, 1, V) for the last
        column only (a prompt's prefill needs no more).

        slot: static-shape mode for CUDA graphs: one token per row (T = 1) written at cache slot `slot` (a 0-d
        long tensor), attending over the whole cache through the mask; `cache.length` is left to the caller.
        Every shape and address is then the same at every step, so the step can be captured once and replayed.
        splice_mask / splice_embeddings: continuous pictures in a prompt, already encoded (`Pictures` as mask and
        embeddings); code_positions (B, T): the new codes' places in their pictures (see `embed_tokens`).
        """
        batch, length = tokens.shape
        if valid is None:
            valid = torch.ones(batch, length, dtype=torch.bool, device=tokens.device)
        start, mask = cache.take_slots(valid, slot)
        cos_table, sin_table = self.rope(tokens.device)
        positions = positions.clamp(min=0)  # padding positions are unused; keep the table lookup in range
        cos, sin = cos_table[positions], sin_table[positions]
        pictures = None
        if splice_mask is not None or splice_embeddings is not None:
            pictures = Pictures(mask=splice_mask, embeddings=splice_embeddings)
        x = self.embed_tokens(tokens, code_positions, pictures)
        for index, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None, None, LayerCache(cache.keys[index], cache.values[index], start, mask))
        if last_only:
            x, length = x[:, -1:], 1
        return self.lm_head(self.norm(x).reshape(batch * length, -1), self.embed).view(batch, length, -1)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 N + 12 L T d (PaLM appendix B), where N counts the
        weights used in matmuls (every projection and the output head; not the embedding lookup). Computed from
        the config, so it holds for partitioned (sharded) parameters too."""
        config = self.config
        attention = config.dim * config.head_dim * (2 * config.n_heads + 2 * config.n_kv_heads)
        feed_forward = 3 * config.dim * config.hidden_dim
        matmul_parameters = config.n_layers * (attention + feed_forward) + config.vocab_size * config.dim
        return 6 * matmul_parameters + 12 * config.n_layers * seq_len * config.dim

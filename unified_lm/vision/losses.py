"""Contrastive image-text losses: SigLIP's pairwise sigmoid loss and CLIP's symmetric InfoNCE.

Both take l2-normalised embeddings x (images) and y (texts), (B, E) each, row i of x paired with row i of y,
and a learnable log-temperature t' (t = exp(t')); the similarity logits are  s_ij = t * x_i . y_j  (+ b).

- SigLIP (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training", section 3.2, Algorithm 1): every
  (i, j) pair is an independent binary "do they match?" problem,
      L = -1/B * sum_i sum_j log sigmoid(z_ij * (t * x_i . y_j + b)),   z_ij = +1 if matched, else -1.
  There is no softmax over the batch, so the loss of a pair does not depend on the rest of the batch. The
  paper initialises t' = log 10 and b = -10: with B - 1 negatives per positive, a large negative bias keeps
  the initial loss from being dominated by the negatives.
- InfoNCE / CLIP (Radford et al. 2021, section 2.3 and Figure 3): each row and each column of the B x B
  logit matrix is a B-way classification whose answer is the diagonal,
      L = 1/2 * [ -1/B sum_i log softmax_j(s_i.)_i  -  1/B sum_j log softmax_i(s_.j)_j ].
  CLIP initialises t = 1/0.07 and clips t at 100 (the model clips; these functions do not).

Duplicate captions. Two pictures of one batch can have identical captions (the world has only 432 different
one-object scenes without a word), and then "caption j is wrong for picture i" is false. Both losses take an
optional `positives` (B, B) bool matrix; `ContrastiveModel` passes "the token ids are equal", so duplicates count
as matches: z_ij = +1 for SigLIP, and InfoNCE's target of a row (column) is spread evenly over its positives
(the soft-target cross-entropy; it reduces to the formula above when `positives` is the identity).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _positives(positives: torch.Tensor | None, size: int, device: torch.device) -> torch.Tensor:
    if positives is None:
        return torch.eye(size, dtype=torch.bool, device=device)
    if positives.shape != (size, size) or not bool(positives.diagonal().all()):
        raise ValueError(f"positives must be a ({size}, {size}) bool matrix with a true diagonal, "
                         f"got shape {tuple(positives.shape)}")
    return positives.bool()


def sigmoid_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, log_temperature: torch.Tensor,
                 bias: torch.Tensor, positives: torch.Tensor | None = None) -> torch.Tensor:
    """SigLIP: -1/B * sum_ij log sigmoid(z_ij * (exp(log_temperature) * x_i . y_j + bias)); returns a scalar.

    image_emb, text_emb: (B, E), l2-normalised; log_temperature, bias: scalars (0-d tensors);
    positives: optional (B, B) bool, true where picture i and text j match (default: the diagonal).
    """
    logits = log_temperature.exp() * image_emb @ text_emb.T + bias  # (B, B)
    signs = _positives(positives, logits.shape[0], logits.device).to(logits.dtype) * 2 - 1  # z_ij in {+1, -1}
    return -F.logsigmoid(signs * logits).sum() / logits.shape[0]


def info_nce_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, log_temperature: torch.Tensor,
                  positives: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: the mean of the picture->text and text->picture cross-entropies of the B x B
    logits exp(log_temperature) * x_i . y_j; returns a scalar.

    image_emb, text_emb: (B, E), l2-normalised; log_temperature: a scalar (0-d tensor);
    positives: optional (B, B) bool (default: the diagonal); a row's (column's) target probability is split
    evenly among its positives.
    """
    logits = log_temperature.exp() * image_emb @ text_emb.T  # (B, B): rows pictures, columns texts
    targets = _positives(positives, logits.shape[0], logits.device).to(logits.dtype)
    image_to_text = F.cross_entropy(logits, targets / targets.sum(1, keepdim=True))
    text_to_image = F.cross_entropy(logits.T, targets.T / targets.T.sum(1, keepdim=True))
    return (image_to_text + text_to_image) / 2

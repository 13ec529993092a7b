"""The one-token decode step with static shapes, replayed as a CUDA graph on GPU.

At batch sizes used for sampling, a decode step is a few hundred small kernels whose launch and Python overhead
can exceed the time the GPU needs to stream the weights. With static shapes (fixed batch, a cache of fixed
capacity, the write slot passed as a tensor: `UnifiedTransformer.decode(..., slot=)`) the step is identical at
every position, so it is captured once as a CUDA graph and replayed; each step then costs one graph launch plus
copies of a few integers into the static input buffers.

Off CUDA the same static step runs eagerly, or through torch.compile when asked (inductor fuses the small ops;
it costs tens of seconds of compilation on CPU, so it pays off only for long generations).
"""
from __future__ import annotations

import torch

from unified_lm.model.transformer import KVCache, UnifiedTransformer

_compiled = {}  # one torch.compile wrapper per device type, so later samplers reuse its compiled graphs


def static_step(model: UnifiedTransformer, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor,
                valid: torch.Tensor, code_positions: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    return model.decode(tokens, cache, positions, valid, slot=slot, code_positions=code_positions)[:, 0]


def compiled_static_step(device_type: str):
    if device_type not in _compiled:  # on CUDA, reduce-overhead mode brings its own CUDA graphs
        _compiled[device_type] = torch.compile(static_step, dynamic=False,
                                               mode="reduce-overhead" if device_type == "cuda" else None)
    return _compiled[device_type]


class StaticDecodeStep:
    """Decode one token for the first `rows` rows of `cache` (a view of it when rows < its batch).

    Create it right after allocating the cache and before the prefill: warming up writes slot 0, which the
    prefill then overwrites. Call with (tokens (rows, 1), positions (rows, 1), valid (rows, 1), code_positions
    (rows, 1), slot int) -> logits (rows, V) fp32; the caller advances `cache.length`. The returned tensor is a static buffer that the
    next call overwrites.
    """

    def __init__(self, model: UnifiedTransformer, cache: KVCache, rows: int, cuda_graph: bool | None = None,
                 compile: bool = False):
        device = cache.key_valid.device
        self.view = cache if rows == cache.key_valid.shape[0] else cache.head(rows)
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.valid = torch.zeros(rows, 1, dtype=torch.bool, device=device)
        self.code_positions = torch.full((rows, 1), -1, dtype=torch.long, device=device)
        self.slot = torch.zeros((), dtype=torch.long, device=device)
        self.model = model
        self.graph = None
        self.function = compiled_static_step(device.type) if compile else static_step
        if (device.type == "cuda" if cuda_graph is None else cuda_graph) and not compile:
            self._capture()

    def _step(self) -> torch.Tensor:
        return self.function(self.model, self.view, self.tokens, self.positions, self.valid, self.code_positions,
                             self.slot)

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture: RoPE table, cuBLAS workspaces, allocator
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, code_positions: torch.Tensor,
                 slot: int) -> torch.Tensor:
        self.tokens.copy_(tokens, non_blocking=True)
        self.positions.copy_(positions, non_blocking=True)
        self.valid.copy_(valid, non_blocking=True)
        self.code_positions.copy_(code_positions, non_blocking=True)
        self.slot.fill_(slot)
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        return self._step()

"""Training data: documents + vqtok token stores -> packed, sharded, memory-mapped rows (`unified-lm prepare`), and the
pixels beside them for the continuous path."""

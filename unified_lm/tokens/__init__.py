"""The token layer: the joint vocabulary (text pieces, specials, image codes), interleaved documents -> token
ids with loss masks, and the real English corpus. Imports nothing else of unified_lm."""

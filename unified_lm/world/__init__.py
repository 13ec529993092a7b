"""The procedural captioned world (the embedded default corpus: scenes, captions, questions, stories with exact
ground truth) and its checker, which reads a picture back into facts. Imports nothing else of unified_lm."""

"""Evaluation: what the trained models do on held-out data against baselines (`unified-lm eval`), discrete vs
continuous understanding (`unified-lm understand`), and the HTML report. Nothing imports this package but the CLI."""

"""The trainer's defaults that more than one module needs: each is defined here, once (no heavy imports)."""

# Peak learning rate (train --lr, LoopConfig, the optimizer presets): suits models of billions of
# parameters; a tiny random model needs ~5e-3 (the demo and the README walkthrough pass it).
DEFAULT_LR = 1e-5

"""Dense building blocks: norms, RoPE, attention, gated MLP."""

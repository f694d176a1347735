"""Mixture-of-experts: routing result + routers, balancing losses, stacked experts, dispatch, layer.

Shape legend (torchtitan style) used in every file of this package:
T tokens (batch x sequence flattened), D model dim, E routed experts, K experts per token,
F expert FFN dim, A assignments (token, expert) pairs, T*K for token-choice top-k.
"""

from moelab.moe.layer import update_router_biases  # noqa: E402,F401  (the trainer's post-step call)

"""Running a model: sampling and single-sequence decoding with a KV cache (``generate.py``), the
batched engine with stop strings, streaming and log-probabilities (``engine.py``), and speculative
decoding with DeepSeek-V3's MTP drafter (``speculative.py``)."""

from moelab.inference.engine import Completion, generate_batch
from moelab.inference.generate import generate, generate_ids, sample_next
from moelab.inference.speculative import SpeculativeStats, speculative_generate_ids

__all__ = ["Completion", "SpeculativeStats", "generate", "generate_batch", "generate_ids", "sample_next",
           "speculative_generate_ids"]

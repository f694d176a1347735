"""Conversion between moelab models and other ecosystems' checkpoints (Hugging Face: ``interop.hf``)."""

"""Data: the built-in domain-labelled corpus, user corpora, byte-level BPE, packing, statistics."""

from moelab.data.corpus import Corpus, builtin_corpus, default_cache_dir, load_corpus
from moelab.data.document import Document
from moelab.data.packing import PackedData, pack, prepare_data
from moelab.data.stats import corpus_info, data_info, unigram_entropy
from moelab.data.tokenizer import EOS, Tokenizer, train_tokenizer

__all__ = [
    "EOS", "Corpus", "Document", "PackedData", "Tokenizer", "builtin_corpus", "corpus_info", "data_info",
    "default_cache_dir", "load_corpus", "pack", "prepare_data", "train_tokenizer", "unigram_entropy",
]

"""Data: tokenizers, corpora (train/val token streams) and deterministic, resumable batching."""

from smet_lab.data.batcher import TokenBatcher, check_streams
from smet_lab.data.corpus import CORPORA, Corpus, check_data, load_corpus, storage_dtype
from smet_lab.data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer

__all__ = ["CORPORA", "ByteTokenizer", "Corpus", "HFTokenizer", "TokenBatcher", "build_tokenizer", "check_data", "check_streams",
           "load_corpus", "storage_dtype"]

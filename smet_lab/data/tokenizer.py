"""Tokenizers: a dependency-free byte tokenizer and a thin wrapper over Hugging Face `tokenizers`.

Both expose the same small surface (name, vocab_size, eos_id, fingerprint, encode, encode_tensors, decode), so the
corpus code never needs to know which one it has.
"""

from __future__ import annotations

import hashlib
import os

import torch

from smet_lab.config import ConfigError, no_such_path

_SPECS = "'byte' or 'hf:<name or path to tokenizer.json>'"


class ByteTokenizer:
    """UTF-8 bytes as token ids: vocabulary 256, no special tokens (documents are joined by "\\n")."""

    name = "byte"
    vocab_size = 256
    eos_id = None

    def fingerprint(self) -> str:
        return "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_tensors(self, texts: list[str]) -> list[torch.Tensor]:
        # Fast path for large corpora: no Python int per byte (torch.frombuffer rejects empty buffers).
        return [torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
                for data in (t.encode("utf-8") for t in texts)]

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return bytes(ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizers.Tokenizer`, used without its post-processor (we insert eos between documents)."""

    _EOS_TOKENS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[EOS]")

    def __init__(self, tok, name: str):
        self._tok, self.name = tok, name
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        ids = (tok.token_to_id(t) for t in self._EOS_TOKENS)
        self.eos_id = next((i for i in ids if i is not None), None)

    def fingerprint(self) -> str:
        """What decides its ids: a hash of its whole definition (vocabulary, model, normalizer, ...)."""
        return hashlib.sha256(self._tok.to_str().encode("utf-8")).hexdigest()

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False: e.g. T5 would otherwise append </s> to every document itself.
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_tensors(self, texts: list[str]) -> list[torch.Tensor]:
        # One batch: the tokenizers library spreads it over every core (the same ids as encode()).
        batch = self._tok.encode_batch(texts, add_special_tokens=False) if texts else []
        return [torch.tensor(e.ids, dtype=torch.int64) for e in batch]

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self._tok.decode(ids)


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """A quick TCP check, so that offline machines fail at once instead of after the hub client's
    retries with backoff (~25 s of noise)."""
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def build_tokenizer(spec: str):
    """'byte' -> ByteTokenizer; 'hf:<path or hub name>' -> HFTokenizer (local files first)."""
    if spec == "byte":
        return ByteTokenizer()
    if not isinstance(spec, str) or not spec.startswith("hf:") or not spec[3:].strip():
        raise ConfigError("data.tokenizer", spec, f"one of {_SPECS}")
    name = os.path.expanduser(spec[3:].strip())
    try:
        from tokenizers import Tokenizer  # lazy: optional dependency (hf extra)
    except ImportError:
        raise ConfigError("data.tokenizer", spec, "needs the 'tokenizers' package (pip install smet_lab[hf])") from None
    path = os.path.join(name, "tokenizer.json") if os.path.isdir(name) else name
    if os.path.isfile(path):
        try:
            return HFTokenizer(Tokenizer.from_file(path), spec)
        except Exception as e:
            raise ConfigError("data.tokenizer", spec, f"cannot read {path} as a tokenizer.json ({e})") from None
    if os.path.isdir(name) or name.endswith(".json") or os.path.isabs(name) or name.startswith("."):  # a local path
        missing = no_such_path(name)
        raise ConfigError("data.tokenizer", spec, f"no tokenizer.json at {path}" + (f" ({missing})" if missing else ""))
    if not hub_reachable():
        raise ConfigError("data.tokenizer", spec, f"cannot load Hugging Face tokenizer '{name}': the hub is not "
                          "reachable (offline?); use 'byte' or hf:<path to tokenizer.json>")
    try:
        return HFTokenizer(Tokenizer.from_pretrained(name), spec)
    except Exception:
        raise ConfigError(
            "data.tokenizer", spec,
            f"cannot load Hugging Face tokenizer '{name}' (offline?); use 'byte' or hf:<path to tokenizer.json>",
        ) from None

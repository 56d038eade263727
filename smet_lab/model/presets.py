"""Model size presets: `tiny` for CPU work and the paper's LLaMA family (GaLore/SMET configs)."""

from __future__ import annotations

import dataclasses

from smet_lab.config import ConfigError, ModelConfig

# name: (dim, ffn_dim, n_layers, n_heads, seq_len). Paper sizes from the released SMET/GaLore configs.
PRESETS: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (64, 176, 2, 4, 64),
    "small": (128, 352, 4, 4, 128),
    "llama_9m": (128, 352, 4, 4, 256),
    "llama_20m": (256, 688, 4, 4, 256),
    "llama_35m": (384, 1024, 6, 8, 256),
    "llama_60m": (512, 1376, 8, 8, 256),
    "llama_130m": (768, 2048, 12, 12, 256),
    "llama_240m": (768, 2416, 24, 16, 256),
    "llama_350m": (1024, 2736, 24, 16, 256),
    "llama_1b": (2048, 5461, 24, 32, 256),
    "llama_7b": (4096, 11008, 32, 32, 256),
}


def model_preset(name: str, **overrides) -> ModelConfig:
    """ModelConfig for a preset; keyword overrides (e.g. vocab_size) win."""
    if name not in PRESETS:
        raise ConfigError("model.name", name, "one of " + ", ".join(PRESETS))
    dim, ffn, layers, heads, seq = PRESETS[name]
    cfg = ModelConfig(name=name, dim=dim, ffn_dim=ffn, n_layers=layers, n_heads=heads, seq_len=seq)
    return dataclasses.replace(cfg, **overrides)


def validate_model(cfg: ModelConfig) -> None:
    for key in ("dim", "n_layers", "n_heads", "ffn_dim", "vocab_size", "seq_len"):
        value = getattr(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"model.{key}", value, "a positive integer")
    if cfg.dim % cfg.n_heads or (cfg.dim // cfg.n_heads) % 2:
        raise ConfigError("model.n_heads", cfg.n_heads, f"must divide model.dim={cfg.dim} into an even head size")

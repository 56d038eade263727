from smet_lab.model.llama import LLaMA, count_parameters
from smet_lab.model.presets import PRESETS, model_preset, validate_model

__all__ = ["LLaMA", "PRESETS", "count_parameters", "model_preset", "validate_model"]

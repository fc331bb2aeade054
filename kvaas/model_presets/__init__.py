"""Built-in model presets and the builder that makes their Hugging Face directories."""

from kvaas.model_presets.builder import build_model, resolve_model
from kvaas.model_presets.presets import PRESETS, Preset

__all__ = ["PRESETS", "Preset", "build_model", "resolve_model"]

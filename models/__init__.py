"""What is trained: modules, configs, exact parameter and FLOP accounting. No I/O beyond reading configs."""

from models.config import ConfigError, MLAConfig, ModelConfig, NgramConfig, PerLayerConfig

__all__ = ["ConfigError", "MLAConfig", "ModelConfig", "NgramConfig", "PerLayerConfig"]

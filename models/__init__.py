"""PKM implementations: the PyTorch reference, the Keras 3 port, and their shared weights.

Imported as ``pkm_models``. The framework modules (``torch_pkm``, ``keras_pkm``) are
separate so that using one framework never imports the other.
"""

from pkm_models.config import PRESETS, TAPS, ConfigError, PKMConfig, Preset, get_preset
from pkm_models.weights import make_weights

__all__ = ["PRESETS", "TAPS", "ConfigError", "PKMConfig", "Preset", "get_preset", "make_weights"]

"""Training toolkit: ERNIEKit-compatible configs, data, losses, the PT/SFT/DPO loop, FSDP2 and LoRA.

Hook: `Trainer(cfg, model_transform=fn)` runs `fn(model, cfg)` on the built single-device model before LoRA
and sharding. `fine_tuning: QAT` (or `qat: true`) fake-quantizes linears during training and exports the packed
quantized checkpoint.
"""

from .config import ConfigError, TrainConfig, config_from_dict, load_config
from .trainer import Trainer, train

__all__ = ["ConfigError", "TrainConfig", "Trainer", "config_from_dict", "load_config", "train"]

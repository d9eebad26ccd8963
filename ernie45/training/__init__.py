"""Training toolkit: ERNIEKit-compatible configs, data, losses, the PT/SFT/DPO loop, FSDP2 and LoRA.

QAT hook: `Trainer(cfg, model_transform=fn)` runs `fn(model, cfg)` on the built single-device model before LoRA
and sharding (where a `prepare_qat` belongs); `fine_tuning: QAT` is rejected as not supported until then.
"""

from .config import ConfigError, TrainConfig, config_from_dict, load_config
from .trainer import Trainer, train

__all__ = ["ConfigError", "TrainConfig", "Trainer", "config_from_dict", "load_config", "train"]

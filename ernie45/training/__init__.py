"""Training toolkit: ERNIEKit-compatible configs, data, losses, one loop for every stage (PT, SFT, DPO, VL-SFT) with
the stage's task (data + objective: text_task.py, vl_task.py), FSDP2 / DDP and LoRA.

Hook: `Trainer(cfg, model_transform=fn)` runs `fn(model, cfg)` on the built single-device model before LoRA
and sharding. `fine_tuning: QAT` (or `qat: true`) fake-quantizes linears during training and exports the packed
quantized checkpoint.
"""

from .config import ConfigError, TrainConfig, config_from_dict, load_config
from .trainer import Trainer, train

__all__ = ["ConfigError", "TrainConfig", "Trainer", "config_from_dict", "load_config", "train"]

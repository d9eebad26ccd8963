"""torchrun entry of the 2-process test: `dist_worker.py CONFIG.json RESULT.json [CONFIG2.json RESULT2.json ...]`
runs each config in turn in one process group (set up here, so the trainer keeps it between runs); rank 0 writes
each run's loss history."""

import json
import os
import sys

import torch
import torch.distributed as dist

from ernie45.training import config_from_dict, train

if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    for cfg_path, result_path in zip(sys.argv[1::2], sys.argv[2::2]):
        with open(cfg_path) as f:
            raw = json.load(f)
        result = train(config_from_dict(raw, source=cfg_path))
        if int(os.environ.get("RANK", "0")) == 0:
            with open(result_path, "w") as f:
                json.dump(result["history"], f)
    dist.destroy_process_group()

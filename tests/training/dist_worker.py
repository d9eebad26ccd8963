"""torchrun entry for the 2-process test: `dist_worker.py CONFIG.json RESULT.json` (rank 0 writes the result)."""

import json
import os
import sys

import torch

from ernie45.training import config_from_dict, train

if __name__ == "__main__":
    torch.set_num_threads(1)
    raw = json.loads(open(sys.argv[1]).read())
    result = train(config_from_dict(raw, source=sys.argv[1]))
    if int(os.environ.get("RANK", "0")) == 0:
        with open(sys.argv[2], "w") as f:
            json.dump(result["history"], f)

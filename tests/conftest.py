import os

import torch

# Tests are sized for 2 CPU cores; more threads only add contention there.
torch.set_num_threads(min(2, os.cpu_count() or 1))

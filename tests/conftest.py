import os

import pytest
import torch

from ernie45.kernels import build

# Tests are sized for 2 CPU cores; more threads only add contention there.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(params=[t.name for t in build.targets()])
def kernel_isa(request):
    """Runs the test once per ISA target of the C kernels (kernels/build.py), every kernel module loading that
    target's build. A target this CPU cannot run is skipped, naming what it lacks (tests/kernels/test_isa_builds.py
    still compiles it)."""
    target = build.target_named(request.param)
    if missing := target.missing_features():
        pytest.skip(f"the {target.name} build needs CPU features this CPU lacks ({', '.join(missing)}); "
                    f"compiled only, by test_isa_builds")
    before = os.environ.get("ERNIE45_KERNEL_ISA")
    os.environ["ERNIE45_KERNEL_ISA"] = target.name
    build.forget_loaded_kernels()
    try:
        yield target
    finally:
        if before is None:
            os.environ.pop("ERNIE45_KERNEL_ISA", None)
        else:
            os.environ["ERNIE45_KERNEL_ISA"] = before
        build.forget_loaded_kernels()

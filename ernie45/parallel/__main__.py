"""`python -m ernie45.parallel RANK LAUNCH_JSON`: one tensor-parallel worker (started by `driver.TensorParallelDriver`)."""

from .worker import main

main()

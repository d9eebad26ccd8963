"""Load time and peak memory of ernie45.load_model vs transformers' from_pretrained, same checkpoint.

Each loader runs in a fresh subprocess. Reported against the checkpoint's weight bytes: peak RSS growth (VmHWM,
which also counts the page-cache pages of the mmapped safetensors file, reclaimable) and the anonymous memory held
after loading (RssAnon: the model's own copy). Meta-device build + in-place copy should hold one copy.

    python benchmarks/bench_load.py [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

LOADERS = {
    "ernie45": "import ernie45; m = ernie45.load_model(PATH, dtype=DTYPE)",
    "transformers": (
        "import torch; from transformers import AutoModelForCausalLM; "
        "m = AutoModelForCausalLM.from_pretrained(PATH, dtype=getattr(torch, DTYPE))"
    ),
}

PROBE = """
import time, sys, torch
import transformers, ernie45  # imported before the baseline so library code is not counted
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
base_rss, base_anon = status("VmRSS"), status("RssAnon")
PATH, DTYPE = sys.argv[1], sys.argv[2]
t = time.perf_counter()
{load}
elapsed = time.perf_counter() - t
print(elapsed, status("VmHWM") - base_rss, status("RssAnon") - base_anon)
"""

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    import torch
    from transformers import Ernie4_5Config, Ernie4_5ForCausalLM

    sys.path.insert(0, "benchmarks")
    from bench_model import SHAPE_0_3B

    torch.manual_seed(0)
    model = Ernie4_5ForCausalLM(Ernie4_5Config(**SHAPE_0_3B)).to(getattr(torch, args.dtype))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        del model
        for name, load in LOADERS.items():
            out = subprocess.run([sys.executable, "-c", PROBE.format(load=load), tmp, args.dtype],
                                 capture_output=True, text=True, check=True)
            elapsed, peak, anon = map(float, out.stdout.split()[-3:])
            results[name] = dict(seconds=elapsed, peak_rss_bytes=peak, anon_bytes=anon,
                                 peak_over_weights=peak / weight_bytes, anon_over_weights=anon / weight_bytes)
    print(f"0.3B shape, {args.dtype}, weights {weight_bytes / 1e9:.2f} GB")
    print(f"{'loader':13} {'seconds':>8} {'peak RSS / weights':>19} {'anon after / weights':>21}")
    for name, r in results.items():
        print(f"{name:13} {r['seconds']:8.2f} {r['peak_over_weights']:19.2f} {r['anon_over_weights']:21.2f}")
    print(json.dumps({"bench": "load", "dtype": args.dtype, "weight_bytes": weight_bytes, "results": results}))


if __name__ == "__main__":
    main()

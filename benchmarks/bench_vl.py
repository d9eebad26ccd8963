"""ERNIE 4.5 VL on the CPU: image preprocessing, vision encoding (ViT + resampler) per image size, and the time to
first token of an image prompt (vision encoding + prefill + one sampled token: each library's own generate with
max_new_tokens=1, KV cache on), ernie45 vs transformers, same random weights, same run.

    python benchmarks/bench_vl.py [--config tiny|mid] [--sizes 224x224,448x448,896x672] [--text 64] [--repeats 3]

`mid` is a scaled-down VL-28B shape (vision width 640, 8 blocks; text width 1024, 6 layers, 16+16 experts, k 4);
`tiny` is the test config (seconds; use it to check the script runs). Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image

import ernie45
from ernie45.generation.generate_vl import generate_vl
from ernie45.processing import ImageProcessor, expand_placeholders

TOKENS = dict(
    image_token_id=100,
    image_start_token_id=101,
    image_end_token_id=102,
    video_start_token_id=103,
    video_end_token_id=104,
    video_token_id=105,
)
CONFIGS = {
    "tiny": (
        dict(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            moe_intermediate_size=[32, 16],
            moe_num_experts=4,
            moe_k=2,
            moe_num_shared_experts=1,
            mlp_layer_types=["dense", "sparse", "sparse"],
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [3, 3, 2]},
        ),
        dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64),
    ),
    "mid": (
        dict(
            vocab_size=32000,
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=6,
            num_attention_heads=8,
            num_key_value_heads=2,
            moe_intermediate_size=[512, 256],
            moe_num_experts=16,
            moe_k=4,
            moe_num_shared_experts=2,
            mlp_layer_types=["dense"] + ["sparse"] * 5,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [22, 22, 20]},
        ),
        dict(depth=8, hidden_size=640, num_heads=8, intermediate_size=2560),
    ),
}


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def build(config_name: str, directory: str):
    from transformers import Ernie4_5_VLMoeConfig, Ernie4_5_VLMoeForConditionalGeneration

    text, vision = CONFIGS[config_name]
    torch.manual_seed(0)
    config = Ernie4_5_VLMoeConfig(text_config=text, vision_config=vision, **TOKENS)
    hf = Ernie4_5_VLMoeForConditionalGeneration(config).eval()
    hf.generation_config.eos_token_id = None
    hf.save_pretrained(directory)
    return hf, ernie45.load_model(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=list(CONFIGS), default="mid")
    parser.add_argument("--sizes", default="224x224,448x448,896x672", help="image sizes WxH, comma-separated")
    parser.add_argument("--text", type=int, default=64, help="text tokens around the image in the prefill prompt")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]

    from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import Ernie4_5_VLMoeImageProcessorPil

    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = build(args.config, tmp)
    hf_proc, our_proc = Ernie4_5_VLMoeImageProcessorPil(), ImageProcessor()
    rng = np.random.default_rng(0)
    rows = []
    for width, height in sizes:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        inputs = our_proc(image)
        pixels, grid = inputs["pixel_values"], inputs["image_grid_thw"]
        half = args.text // 2
        prompt = list(range(3, 3 + half)) + [101, 100, 102] + list(range(3, 3 + args.text - half))
        mm = expand_placeholders(prompt, ours.config, grid)
        mm.update(inputs)
        media = {"pixel_values": pixels, "image_grid_thw": grid}
        with torch.inference_mode():
            row = {
                "size": f"{width}x{height}",
                "patches": int(grid.prod()),
                "prompt_tokens": mm["input_ids"].shape[1],
                "preprocess_ours_s": timed(lambda: our_proc(image), args.repeats),
                "preprocess_hf_s": timed(lambda: hf_proc(image, return_tensors="pt"), args.repeats),
                "vision_ours_s": timed(lambda: ours.get_image_features(pixels, grid), args.repeats),
                "vision_hf_s": timed(lambda: hf.model.get_image_features(pixels, grid), args.repeats),
                "ttft_ours_s": timed(
                    lambda: generate_vl(ours, mm["input_ids"], max_new_tokens=1, **media), args.repeats
                ),
                "ttft_hf_s": timed(
                    lambda: hf.generate(**mm, max_new_tokens=1, do_sample=False, pad_token_id=0), args.repeats
                ),
            }
        for stage in ("preprocess", "vision", "ttft"):
            row[f"{stage}_speedup"] = row[f"{stage}_hf_s"] / row[f"{stage}_ours_s"]
        rows.append(row)

    print(
        f"ERNIE 4.5 VL ({args.config} config, random weights, float32), {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads"
    )
    header = f"{'image':>10} {'patches':>8} {'tokens':>7} | {'stage':>10} {'ours ms':>9} {'hf ms':>9} {'hf/ours':>8}"
    print(header)
    print("-" * len(header))
    for row in rows:
        for stage in ("preprocess", "vision", "ttft"):
            print(
                f"{row['size']:>10} {row['patches']:>8} {row['prompt_tokens']:>7} | {stage:>10} "
                f"{row[f'{stage}_ours_s'] * 1e3:9.1f} {row[f'{stage}_hf_s'] * 1e3:9.1f} {row[f'{stage}_speedup']:8.2f}"
            )
    print(json.dumps({"bench": "vl", "config": args.config, "threads": torch.get_num_threads(), "results": rows}))


if __name__ == "__main__":
    main()

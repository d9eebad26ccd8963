"""Paddle `.pdparams` state dicts read without the Paddle runtime. `paddle.save(state_dict)` writes a pickle of
numpy arrays (bf16 as uint16) plus a "StructuredToParameterName@@" name table (checked against paddlepaddle 3.3.1's
own output); the unpickler here admits exactly numpy's array classes, so a file cannot run code.

`.pdparams` checkpoints are whole-file pickles (no mmap), so ernie45 loads them through a one-off conversion:
`pdparams_to_safetensors` rewrites each shard (one in memory at a time) as safetensors under the same tensor names,
and the normal loader then reads the result in whichever layout it is (`ernie45 convert` does this itself)."""

from __future__ import annotations

import json
import pickle
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

MODEL_FILE = "model_state.pdparams"
MODEL_INDEX = "model_state.pdparams.index.json"
_NAME_TABLE = "StructuredToParameterName@@"


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits numpy arrays, dtypes and OrderedDict; any other class is refused."""

    _ALLOWED = frozenset({("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                          ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
                          ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")})

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not a numpy array class")
        return super().find_class(module, name)


def read_pdparams(file: Path) -> dict[str, np.ndarray]:
    """name -> array of one .pdparams file (the name table dropped)."""
    with open(file, "rb") as fh:
        try:
            raw = NumpyOnlyUnpickler(fh).load()
        except pickle.UnpicklingError as exc:
            raise ValueError(f"{file}: not a paddle.save state dict of numpy arrays: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: not a state dict (a {type(raw).__name__})")  # noqa: TRY004 (bad file, not type)
    if "UnpackBigParamInfor@@" in raw:
        raise ValueError(f"{file}: saved with pickle protocol < 4 (big tensors split in slices); re-save it with "
                         f"paddle.save(state_dict, path, protocol=4)")
    # A tensor pickled outside a state dict is (name, ndarray) (paddle's reduce_varbase); in one, an ndarray.
    raw = {k: v[1] if isinstance(v, tuple) and len(v) == 2 else v for k, v in raw.items() if k != _NAME_TABLE}
    bad = [k for k, v in raw.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise ValueError(f"{file}: entries that are not arrays: {', '.join(bad[:5])}")
    return raw


def pdparams_files(directory: Path) -> list[Path]:
    """The .pdparams shards of a checkpoint directory (from model_state.pdparams.index.json when sharded)."""
    index = directory / MODEL_INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that are not in {directory}: {', '.join(missing)}")
        return [directory / n for n in names]
    return [directory / MODEL_FILE] if (directory / MODEL_FILE).is_file() else []


def pdparams_to_safetensors(src: Path, dst: Path) -> Path:
    """Rewrite the .pdparams checkpoint `src` as safetensors in `dst` (same names and layout; other files copied)."""
    shards = pdparams_files(src)
    if not shards:
        raise FileNotFoundError(f"{src}: no {MODEL_FILE} or {MODEL_INDEX}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, start=1):
            arrays = read_pdparams(shard)  # one shard in memory at a time
            name = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp / name),
                      metadata={"format": "np"})
            weight_map.update(dict.fromkeys(arrays, name))
            total += sum(v.nbytes for v in arrays.values())
            del arrays
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        for f in src.iterdir():
            if f.is_file() and not f.name.endswith((".pdparams", MODEL_INDEX)):
                shutil.copy2(f, tmp / f.name)
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst

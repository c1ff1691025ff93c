"""Quantized checkpoints: the packed codes, fp16 scales and int8 zero points themselves, as safetensors.

A folder like minimoe.checkpoint's, plus one file:
    config.json          the ModelConfig
    quantization.json    every quantized layer: its name, kind ("linear" or "experts"), sizes and Scheme
    model.safetensors    the state dict: quantized layers' `codes` / `scale` / `zero`, everything else as is
    manifest.json        size and SHA-256 of every other file, written last (checked on load)
It is written by minimoe.checkpoint's atomic_folder, and so has its guarantee: after a crash at any point of a save,
load_quantized(path) loads the old checkpoint or the new one.
Loading rebuilds the model from config.json and quantization.json, then checks every tensor of the file
against the shape and dtype the config implies before loading a byte: a file whose packed tensors do not match
its config is refused with a ValueError naming the tensor. `stored_bytes` reads the bytes each tensor occupies
from the file's header, which is how chapter 5 measures compression.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model

from ..checkpoint import CheckpointError, atomic_folder, checkpoint_folder, fresh_model, load_config, verify_checkpoint
from ..model import MiniLM
from .formats import Scheme
from .layers import KERNELS, QuantExperts, QuantLinear
from .policy import _set_module, is_quantized

QUANT_FILE = "quantization.json"
FORMAT = "minimoe.quant/1"


def layer_table(model: torch.nn.Module) -> dict:
    """{name: description} of every quantized layer (the content of quantization.json's "layers")."""
    table = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantExperts):
            s = m.gate_up[0].scheme
            table[name] = {"type": "experts", "n_experts": m.n_experts, "d_model": m.d_model, "d_ff": m.d_ff,
                           **_scheme_dict(s)}
        elif isinstance(m, QuantLinear) and ".experts." not in name:
            table[name] = {"type": "linear", "in_features": m.in_features, "out_features": m.out_features,
                           "bias": m.bias is not None, **_scheme_dict(m.scheme)}
    return table


def _scheme_dict(s: Scheme) -> dict:
    return {"bits": s.bits, "group_size": s.group_size, "symmetric": s.symmetric,
            "activation_quant": s.activation_quant, "method": s.method}


def save_quantized(model: MiniLM, path: str | Path) -> Path:
    """Write a quantized MiniLM to the folder `path`; a crash at any point leaves the old checkpoint or the new."""
    if not is_quantized(model):
        raise ValueError("save_quantized needs a quantized model (minimoe.quant.quantize); use "
                         "minimoe.checkpoint.save_checkpoint for a full-precision one")
    with atomic_folder(path) as tmp:
        model.config.to_json(tmp / "config.json")
        (tmp / QUANT_FILE).write_text(json.dumps({"format": FORMAT, "layers": layer_table(model)}, indent=1))
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt", "minimoe": FORMAT})
    return Path(path)


def load_quantized(path: str | Path, device: str | torch.device = "cpu", kernel: str = "auto") -> MiniLM:
    """The quantized MiniLM saved at `path` (CheckpointError, a ValueError, for anything that does not match)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    path = checkpoint_folder(path)  # `path`, or the copy a save killed between its two renames left beside it
    manifest = verify_checkpoint(path)
    if QUANT_FILE not in manifest:
        raise CheckpointError(f"{path} is not a quantized checkpoint (no {QUANT_FILE}); load it with "
                              "minimoe.checkpoint.load_checkpoint")
    info = json.loads((path / QUANT_FILE).read_text())
    if info.get("format") != FORMAT:
        raise CheckpointError(f"{path / QUANT_FILE}: unknown format {info.get('format')!r} (expected {FORMAT})")
    model = fresh_model(load_config(path))  # its random init leaves the caller's random state alone
    for name, layer in info["layers"].items():
        _set_module(model, name, _build_layer(model, name, layer, kernel))
    _check_tensors(model, path / "model.safetensors")
    load_model(model, str(path / "model.safetensors"), strict=True)
    return model.to(device).eval()


def _build_layer(model, name, layer, kernel):
    """An empty quantized layer for quantization.json's entry, checked against the module it replaces."""
    try:
        old = model.get_submodule(name)
        scheme = Scheme(layer["bits"], layer["group_size"], layer["symmetric"], layer["activation_quant"],
                        layer["method"])
        if layer["type"] == "experts":
            sizes = (layer["n_experts"], layer["d_model"], layer["d_ff"])
            if sizes != (old.n_experts, old.d_model, old.d_ff):
                raise ValueError(f"experts of sizes {sizes} where the config has "
                                 f"{(old.n_experts, old.d_model, old.d_ff)}")
            return QuantExperts(*sizes, scheme, name, kernel)
        sizes = (layer["in_features"], layer["out_features"])
        if sizes != (old.in_features, old.out_features):
            raise ValueError(f"a {sizes[0]} -> {sizes[1]} layer where the config has "
                             f"{old.in_features} -> {old.out_features}")
        return QuantLinear(*sizes, scheme, layer["bias"], name, kernel)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{QUANT_FILE} does not match config.json at layer {name!r}: {e}") from None


def _check_tensors(model, file: Path) -> None:
    """Every tensor of the file must have the name, shape and dtype the config and schemes imply."""
    expected = model.state_dict()
    with safe_open(str(file), framework="pt") as f:
        found = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    for k, t in expected.items():
        if k not in found:
            if k == "lm_head.weight" and model.config.tie_embeddings:
                continue  # a tied head is stored once, as embed.weight
            raise CheckpointError(f"{file} has no tensor {k}")
        shape, dtype = found[k]
        want = str(t.dtype).replace("torch.", "")
        if shape != tuple(t.shape) or _st_dtype(dtype) != want:
            raise CheckpointError(f"{file}: tensor {k} is {_st_dtype(dtype)} {list(shape)}, but config.json and "
                                  f"{QUANT_FILE} imply {want} {list(t.shape)} (packed codes, scales or zero points "
                                  "do not match the layer's sizes and scheme)")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise CheckpointError(f"{file} has tensors its config does not explain: {extra[:5]}")


_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I8": "int8", "U8": "uint8",
              "I32": "int32", "I64": "int64", "BOOL": "bool", "F64": "float64"}


def _st_dtype(name: str) -> str:
    return _ST_DTYPES.get(name, name.lower())


def stored_bytes(file: str | Path) -> dict[str, int]:
    """{tensor name: bytes it occupies in the safetensors file}, read from the file's own header."""
    file = Path(file)
    if file.is_dir():
        file = file / "model.safetensors"
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}

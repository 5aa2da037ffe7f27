"""Import a Hugging Face transformers checkpoint directory into `HybridLM`.

A directory written by transformers' ``save_pretrained`` (``config.json`` plus
``model.safetensors`` or sharded ``model-*.safetensors`` with ``model.safetensors.index.json``)
loads when its architecture maps onto HybridLM exactly (same logits on the same input):

- ``mamba2`` (``Mamba2ForCausalLM``): every layer is one HybridLM "M" block. Mapped fields:
  hidden_size -> d_model, num_hidden_layers -> n_layer (pattern ``M*n``), vocab_size,
  layer_norm_epsilon -> norm_eps, state_size -> mamba.d_state, head_dim -> mamba.headdim,
  expand, conv_kernel -> mamba.d_conv, n_groups -> mamba.ngroups (the gated output norm is
  per group: mamba.norm_per_group), use_conv_bias -> mamba.conv_bias, tie_word_embeddings ->
  tie_embeddings. Refused (ValueError naming the field): use_bias true (in_proj/out_proj
  biases), hidden_act other than silu, a time_step_limit other than (0, inf) (dt clamping),
  num_heads * head_dim != expand * hidden_size, a non-integer expand.
  Ignored, with no effect on the logits: chunk_size (a kernel tiling choice: HybridLM uses
  its own, mamba.chunk_size), residual_in_fp32 (HybridLM's residual stream is always fp32,
  its weights are fp32), and the init-only fields (initializer_range, time_step_min/max/floor/
  rank, rescale_prenorm_residual) and token ids.
- ``bamba`` and every other model type are refused: a Bamba layer has an MLP after its
  Mamba mixer and its attention rotates only half of each head (partial_rotary_factor 0.5),
  neither of which HybridLM's blocks have.

Weights are stored fp32 (HybridLM's convention) whatever the checkpoint's dtype.

Public API::

    from refrag.model.hf_import import import_transformers, transformers_config

    model = import_transformers("path/to/dir")          # HybridLM with the checkpoint's weights
    model = import_transformers(dir, overrides={"grad_checkpoint": True, "mamba": {"doc_mode": False}},
                                vocab_size=50304)        # more rows: new embeddings (see resize_vocab)
    config = transformers_config(dir)                   # the ModelConfig it maps to
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from refrag.model.config import ModelConfig
from refrag.model.lm import HybridLM

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
SUPPORTED_MODEL_TYPES = ("mamba2",)
# ModelConfig keys an import may override: they change how HybridLM runs, not what its weights are.
RUNTIME_KEYS = ("grad_checkpoint", "doc_positions")
RUNTIME_MAMBA_KEYS = ("doc_mode", "chunk_size")

_REFUSED_TYPES = {
    "bamba": "each Bamba layer has an MLP after its Mamba mixer and its attention applies RoPE to half of "
             "each head (partial_rotary_factor 0.5); HybridLM's Mamba block has no MLP and its RoPE spans "
             "the whole head",
    "mamba": "Mamba-1 (selective scan) layers; HybridLM's M block is Mamba-2 (SSD)",
}


def _float_hook(obj: dict):
    """transformers >= 5 writes non-finite floats as {"__float__": "Infinity"}."""
    if set(obj) == {"__float__"}:
        return float(obj["__float__"])
    return obj


def read_transformers_config(path: str | Path) -> dict:
    """The config.json of checkpoint directory `path` as a dict (ValueError when missing or unreadable)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory; give a transformers checkpoint directory "
                         f"(config.json + {WEIGHTS_FILE})")
    file = path / CONFIG_FILE
    if not file.is_file():
        raise ValueError(f"{path} has no {CONFIG_FILE}; not a transformers checkpoint directory")
    try:
        values = json.loads(file.read_text(encoding="utf-8"), object_hook=_float_hook)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{file} must hold a JSON object")
    return values


def transformers_config(source: str | Path | dict, overrides: dict | None = None) -> ModelConfig:
    """The ModelConfig a transformers config (a checkpoint directory or its config.json dict)
    maps to; ValueError naming the field when HybridLM cannot represent it. overrides: runtime
    ModelConfig keys (RUNTIME_KEYS, and "mamba": {RUNTIME_MAMBA_KEYS}) applied on top."""
    hf = source if isinstance(source, dict) else read_transformers_config(source)
    model_type = hf.get("model_type")
    if model_type in _REFUSED_TYPES:
        raise ValueError(f"transformers model_type {model_type!r} does not map onto HybridLM: "
                         f"{_REFUSED_TYPES[model_type]}. Supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"transformers model_type {model_type!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    values = _mamba2_config(hf)
    _apply_overrides(values, overrides or {})
    try:
        return ModelConfig.from_dict(values)
    except ValueError as err:
        raise ValueError(f"transformers {model_type} config does not map onto HybridLM: {err}") from None


def _field(hf: dict, name: str, default=None):
    value = hf.get(name, default)
    if value is None:
        raise ValueError(f"transformers config field {name!r} is missing")
    return value


def _refuse(name: str, value, why: str):
    raise ValueError(f"transformers config field {name}={value!r} is not supported: {why}")


def _mamba2_config(hf: dict) -> dict:
    """ModelConfig dict of a transformers Mamba2Config dict (defaults: Mamba2Config's)."""
    d_model = _field(hf, "hidden_size")
    expand = _field(hf, "expand", 2)
    if isinstance(expand, float) and expand.is_integer():
        expand = int(expand)
    if not isinstance(expand, int) or isinstance(expand, bool):
        _refuse("expand", expand, "HybridLM's mamba.expand is an integer")
    num_heads, head_dim = _field(hf, "num_heads", 128), _field(hf, "head_dim", 64)
    if num_heads * head_dim != expand * d_model:
        _refuse("num_heads", num_heads, f"num_heads * head_dim ({num_heads} * {head_dim}) must equal "
                f"expand * hidden_size ({expand} * {d_model})")
    if hf.get("use_bias", False):
        _refuse("use_bias", hf["use_bias"], "HybridLM's Mamba in_proj and out_proj have no bias")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        _refuse("hidden_act", act, "HybridLM's Mamba conv activation is silu")
    limit = hf.get("time_step_limit", (0.0, math.inf))
    if limit is not None and (len(limit) != 2 or limit[0] > 0 or limit[1] != math.inf):
        _refuse("time_step_limit", limit, "HybridLM does not clamp dt; only (0.0, inf) maps")
    return dict(
        vocab_size=_field(hf, "vocab_size"),
        d_model=d_model,
        n_layer=_field(hf, "num_hidden_layers"),
        block_pattern=f"M*{_field(hf, 'num_hidden_layers')}",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        mamba=dict(d_state=_field(hf, "state_size", 128), headdim=head_dim, expand=expand,
                   d_conv=_field(hf, "conv_kernel", 4), ngroups=_field(hf, "n_groups", 8),
                   conv_bias=bool(hf.get("use_conv_bias", True)), norm_per_group=True),
    )


def _apply_overrides(values: dict, overrides: dict) -> None:
    if not isinstance(overrides, dict):
        raise ValueError(f"model overrides must be a dict, got {type(overrides).__name__}")
    for key, value in overrides.items():
        if key == "mamba":
            if not isinstance(value, dict):
                raise ValueError(f"model override mamba must be a dict, got {type(value).__name__}")
            for sub, sub_value in value.items():
                if sub not in RUNTIME_MAMBA_KEYS:
                    raise ValueError(f"model key mamba.{sub} is fixed by the imported checkpoint; only "
                                     f"{', '.join('mamba.' + k for k in RUNTIME_MAMBA_KEYS)} and "
                                     f"{', '.join(RUNTIME_KEYS)} may be overridden")
                values["mamba"][sub] = sub_value
        elif key in RUNTIME_KEYS:
            values[key] = value
        else:
            raise ValueError(f"model key {key} is fixed by the imported checkpoint; only "
                             f"{', '.join(RUNTIME_KEYS)} and {', '.join('mamba.' + k for k in RUNTIME_MAMBA_KEYS)} "
                             "may be overridden")


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint directory's model.safetensors (or its shards) on the CPU."""
    from safetensors.torch import load_file

    path = Path(path)
    index = path / WEIGHTS_INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index}: not a safetensors index ({err})") from None
        files = sorted(set(weight_map.values()))
    elif (path / WEIGHTS_FILE).is_file():
        files = [WEIGHTS_FILE]
    else:
        found = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = (f" (found {', '.join(found[:3])}: re-save it with save_pretrained(..., safe_serialization=True))"
                if found else "")
        raise ValueError(f"{path} has no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        file = path / name
        if not file.is_file():
            raise ValueError(f"{index} names shard {name}, which is missing")
        try:
            tensors.update(load_file(str(file), device="cpu"))
        except Exception as err:  # safetensors raises its own error type on corrupt files
            raise ValueError(f"{file}: not a readable safetensors file ({err})") from None
    return tensors


def convert_mamba2_state(hf_state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """HybridLM state dict (fp32) from a transformers Mamba2ForCausalLM state dict; ValueError
    on a missing, unexpected or wrongly shaped tensor."""
    state = dict(hf_state)

    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise ValueError(f"checkpoint has no tensor {name!r}")
        return state.pop(name).float()

    out = {"embed.weight": take("backbone.embeddings.weight"), "norm.weight": take("backbone.norm_f.weight")}
    for i in range(config.n_layer):
        hf, ours = f"backbone.layers.{i}.", f"blocks.{i}."
        out[ours + "norm.weight"] = take(hf + "norm.weight")
        for name in ("in_proj.weight", "out_proj.weight", "A_log", "D", "dt_bias"):
            out[ours + name] = take(hf + "mixer." + name)
        conv = take(hf + "mixer.conv1d.weight")
        if conv.dim() != 3 or conv.shape[1] != 1:
            raise ValueError(f"{hf}mixer.conv1d.weight must be a depthwise (channels, 1, width) kernel, "
                             f"got {tuple(conv.shape)}")
        out[ours + "conv_weight"] = conv[:, 0]
        if config.mamba.conv_bias:
            out[ours + "conv_bias"] = take(hf + "mixer.conv1d.bias")
        out[ours + "out_norm.weight"] = take(hf + "mixer.norm.weight")
    head = state.pop("lm_head.weight", None)
    if config.tie_embeddings:
        if head is not None and not torch.equal(head.float(), out["embed.weight"]):
            raise ValueError("tie_word_embeddings is true but lm_head.weight differs from the embeddings")
        out["lm_head.weight"] = out["embed.weight"]
    elif head is None:
        raise ValueError("tie_word_embeddings is false but the checkpoint has no lm_head.weight")
    else:
        out["lm_head.weight"] = head.float()
    if state:
        names = sorted(state)
        raise ValueError(f"checkpoint has {len(names)} tensor(s) HybridLM has no place for: "
                         f"{', '.join(names[:5])}{'...' if len(names) > 5 else ''}")
    return out


def resize_vocab(model: HybridLM, vocab_size: int) -> HybridLM:
    """A HybridLM with `vocab_size` >= model's embedding rows: old rows kept, new rows (e.g.
    special tokens added to the tokenizer) set to the mean of the old ones in the embedding
    and the LM head (so new tokens start with average logits, not random ones)."""
    old = model.config.vocab_size
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < old:
        raise ValueError(f"vocab_size must be an int >= the model's {old}, got {vocab_size!r}")
    if vocab_size == old:
        return model
    config = ModelConfig.from_dict({**model.config.to_dict(), "vocab_size": vocab_size})
    grown = HybridLM(config)
    state = model.state_dict()
    for name in ("embed.weight", "lm_head.weight"):
        rows = state[name]
        state[name] = torch.cat([rows, rows.mean(0, keepdim=True).expand(vocab_size - old, -1)])
    grown.load_state_dict(state)
    return grown


def import_transformers(path: str | Path, overrides: dict | None = None, vocab_size: int | None = None) -> HybridLM:
    """HybridLM holding the weights of transformers checkpoint directory `path` (see the module
    docstring for what maps). overrides: runtime ModelConfig keys (see transformers_config).
    vocab_size: grow the vocabulary to this many rows (resize_vocab), e.g. for added special tokens."""
    config = transformers_config(path, overrides)
    state = convert_mamba2_state(read_safetensors(path), config)
    model = HybridLM(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # size mismatches: the config and the tensors disagree
        raise ValueError(f"{path}: the weights do not fit the config: {err}") from None
    if vocab_size is not None:
        model = resize_vocab(model, vocab_size)
    return model

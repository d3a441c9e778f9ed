"""MiniMind: a small decoder-only language model, written to be read top to bottom.

The architecture is the Llama/Qwen3 family at toy scale:

    tokens -> embedding -> N x [RMSNorm -> attention (GQA + RoPE) -> +residual
                               RMSNorm -> SwiGLU MLP (or MoE)     -> +residual]
           -> RMSNorm -> lm_head (tied to the embedding) -> next-token logits

Two layouts share this file. MiniMind2 is Llama-shaped (head_dim = hidden / heads). minimind-3 is
Qwen3-shaped: an explicit `head_dim`, an RMSNorm on every query and key head (`qk_norm`), and a
top-1 MoE without shared experts. Parameter names follow transformers' Llama/Qwen3 naming, so the
original MiniMind checkpoints load with `strict=True`, and a dense model maps 1:1 onto
`LlamaForCausalLM` / `Qwen3ForCausalLM`.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.utils import ModelOutput


# ---------------------------------------------------------------------------------------------
# 1. Configuration
# ---------------------------------------------------------------------------------------------

class MiniMindConfig(PretrainedConfig):
    """Model hyper-parameters. `MiniMindConfig()` is MiniMind2-Small (25.8M parameters).

    Keyword names are the original MiniMind's, so its `config.json` files load unchanged. The
    minimind-3 release names three MoE fields differently (`num_experts`, `router_aux_loss_coef`,
    `moe_intermediate_size`) and has no `qk_norm` key because q/k norm is always on there; those
    names are accepted here and a config that uses them is read as the minimind-3 layout.
    """

    model_type = "minimind"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        hidden_size: int = 512,
        num_hidden_layers: int = 8,
        num_attention_heads: int = 8,
        num_key_value_heads: int = 2,
        head_dim: int | None = None,
        vocab_size: int = 6400,
        intermediate_size: int | None = None,
        max_position_embeddings: int = 32768,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 1e6,
        hidden_act: str = "silu",
        dropout: float = 0.0,
        flash_attn: bool = True,
        inference_rope_scaling: bool = False,
        qk_norm: bool | None = None,
        use_moe: bool = False,
        num_experts_per_tok: int = 2,
        n_routed_experts: int = 4,
        n_shared_experts: int | None = None,
        scoring_func: str = "softmax",
        aux_loss_alpha: float = 0.01,
        seq_aux: bool | None = None,
        norm_topk_prob: bool = True,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        pad_token_id: int = 0,
        tie_word_embeddings: bool = True,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        # minimind-3 spellings of the MoE fields; their presence marks a minimind-3 config.
        minimind3_names = {"num_experts", "router_aux_loss_coef", "moe_intermediate_size"}
        is_minimind3 = bool(minimind3_names & kwargs.keys())
        n_routed_experts = kwargs.pop("num_experts", n_routed_experts)
        aux_loss_alpha = kwargs.pop("router_aux_loss_coef", aux_loss_alpha)
        moe_intermediate_size = kwargs.pop("moe_intermediate_size", None)
        kwargs.pop("rope_scaling", None)  # derived from inference_rope_scaling, see `yarn` below
        kwargs.pop("rope_parameters", None)
        super().__init__(
            bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings, **kwargs,
        )
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.vocab_size = vocab_size
        if intermediate_size is None:
            # SwiGLU has three matrices, so 8/3 * hidden keeps the MLP's parameter count at that of a
            # 4x GELU MLP; rounded up to a multiple of 64 for efficient matmuls.
            intermediate_size = 64 * math.ceil(int(hidden_size * 8 / 3) / 64)
        self.intermediate_size = moe_intermediate_size or intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.hidden_act = hidden_act
        self.dropout = dropout
        self.flash_attn = flash_attn
        self.inference_rope_scaling = inference_rope_scaling
        self.qk_norm = is_minimind3 if qk_norm is None else qk_norm
        self.use_moe = use_moe
        self.num_experts_per_tok = num_experts_per_tok
        self.n_routed_experts = n_routed_experts
        self.n_shared_experts = (0 if is_minimind3 else 1) if n_shared_experts is None else n_shared_experts
        self.scoring_func = scoring_func
        self.aux_loss_alpha = aux_loss_alpha
        self.seq_aux = (not is_minimind3) if seq_aux is None else seq_aux
        self.norm_topk_prob = norm_topk_prob
        self.initializer_range = initializer_range

    @property
    def yarn(self) -> dict | None:
        """YaRN context extension used at inference when `inference_rope_scaling` is on: positions up
        to 16 x 2048 = 32768 with the frequencies of a model trained on 2048."""
        if not self.inference_rope_scaling:
            return None
        return {"factor": 16.0, "original_max_position_embeddings": 2048, "beta_fast": 32.0,
                "beta_slow": 1.0, "attention_factor": 1.0}


# Named sizes. Each gives exactly the parameter count in the comment (tied embedding counted once).
PRESETS: dict[str, dict] = {
    # 25,829,888: the original's default, trains on a laptop CPU.
    "minimind2-small": dict(hidden_size=512, num_hidden_layers=8),
    # 104,030,976
    "minimind2": dict(hidden_size=768, num_hidden_layers=16),
    # 145,029,760: 4 routed experts, top-2, plus 1 shared expert.
    "minimind2-moe": dict(hidden_size=640, num_hidden_layers=8, use_moe=True),
    # 63,912,192: Qwen3-shaped.
    "minimind3": dict(hidden_size=768, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                      head_dim=96, intermediate_size=2432, rms_norm_eps=1e-6, qk_norm=True),
    # 198,416,640: 4 experts, top-1, no shared expert, token-level balance loss.
    "minimind3-moe": dict(hidden_size=768, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                          head_dim=96, intermediate_size=2432, rms_norm_eps=1e-6, qk_norm=True,
                          use_moe=True, n_routed_experts=4, num_experts_per_tok=1, n_shared_experts=0,
                          aux_loss_alpha=5e-4, seq_aux=False),
    # Debug sizes for tests: a forward/backward takes milliseconds.
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=2048),
    "tiny-moe": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     max_position_embeddings=2048, use_moe=True),
}


# ---------------------------------------------------------------------------------------------
# 2. Normalisation
# ---------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """x / rms(x) * weight. Cheaper than LayerNorm (no mean subtraction, no bias) and as stable.
    Computed in fp32 even under bf16 autocast: the mean of squares loses too much in 8 mantissa bits."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.type_as(x)


# ---------------------------------------------------------------------------------------------
# 3. Rotary position embedding (RoPE), with YaRN for long contexts
# ---------------------------------------------------------------------------------------------

def rope_inverse_frequencies(head_dim: int, theta: float, yarn: dict | None = None) -> tuple[torch.Tensor, float]:
    """Rotation speed of each pair of channels, and the factor applied to cos/sin.

    RoPE rotates channel pair i of a query/key at position p by the angle p * theta^(-2i/d): fast
    rotations for the first pairs, slow ones for the last. YaRN stretches a model to positions it
    never saw by slowing down only the pairs whose wavelength is longer than the training context
    (they would otherwise meet unseen angles), leaving the fast pairs, which encode local order, alone;
    a linear ramp blends the two regions between `beta_fast` and `beta_slow` full rotations.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if yarn is None:
        return inv_freq, 1.0
    factor, original_context = yarn["factor"], yarn["original_max_position_embeddings"]

    def pair_with_rotations(rotations: float) -> float:
        # index of the channel pair that turns `rotations` times over the original context
        return head_dim * math.log(original_context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(pair_with_rotations(yarn["beta_fast"])), 0)
    high = min(math.ceil(pair_with_rotations(yarn["beta_slow"])), head_dim // 2 - 1)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
    inv_freq = inv_freq * (1 - ramp) + inv_freq / factor * ramp
    return inv_freq, yarn["attention_factor"]


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the given positions, computed on the fly in fp32.

    Nothing is stored as a buffer: a cached table would be cast to bf16 by `model.to(bfloat16)`
    (losing position precision) and is left uninitialised by transformers' meta-device loading.
    """

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.head_dim, self.theta, self.yarn = config.head_dim, config.rope_theta, config.yarn

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, scale = rope_inverse_frequencies(self.head_dim, self.theta, self.yarn)
        angles = position_ids.float().unsqueeze(-1) * inv_freq.to(position_ids.device)  # (B, T, D/2)
        angles = torch.cat([angles, angles], dim=-1)  # pair i is channels (i, i + D/2)
        return angles.cos() * scale, angles.sin() * scale


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_i, x_{i+D/2}) of x (B, H, T, D) by its angle; cos/sin are (B, T, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated_half * sin).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# 4. Attention: grouped-query, causal, packed-document aware, with a KV cache
# ---------------------------------------------------------------------------------------------

def attention_allowed(attention_mask: torch.Tensor | None, query_len: int, past_len: int) -> torch.Tensor | None:
    """Boolean (B, 1, Tq, Tk) matrix of which key each query may see, or None for plain causal.

    `attention_mask` (B, past + Tq) is transformers' padding mask (1 = token, 0 = padding) and may
    also carry document ids for packed rows (1, 1, 1, 2, 2, 3, ..., 0 = padding): a query then sees
    earlier keys of its own document only, so packing several documents into one row trains exactly
    as if each were alone. Every query also sees itself, so padding rows never become all -inf (NaN).
    A 4-D boolean mask is already that matrix (model/generate.py's decode loop builds one from its
    cache, as transformers' models accept one) and is used as it is.
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask
    no_padding = attention_mask is None or bool((attention_mask == 1).all())
    if no_padding and (past_len == 0 or query_len == 1):
        return None  # plain causal: SDPA's is_causal, or a single new query that sees every key
    key_len = past_len + query_len
    device = attention_mask.device if attention_mask is not None else None
    query_pos = torch.arange(past_len, key_len, device=device)[:, None]
    key_pos = torch.arange(key_len, device=device)[None, :]
    allowed = (key_pos <= query_pos)[None, None]
    if not no_padding:
        doc_of_key = attention_mask[:, None, None, :key_len]
        doc_of_query = attention_mask[:, None, past_len:key_len, None]
        allowed = allowed & (doc_of_key == doc_of_query) & (doc_of_key != 0)
    return allowed | (key_pos == query_pos)


class Attention(nn.Module):
    def __init__(self, config: MiniMindConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        if config.qk_norm:
            # minimind-3 / Qwen3: normalising each head's q and k bounds the attention logits,
            # which keeps training stable at higher learning rates.
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.dropout = config.dropout
        self.use_sdpa = config.flash_attn

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, allowed: torch.Tensor | None,
                cache: Cache | None) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        q = self.q_proj(x).view(batch, seq_len, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, seq_len, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seq_len, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:  # keys are cached after RoPE: each keeps the angle of its own position
            k, v = cache.update(k, v, self.layer_idx)
        # Grouped-query attention: each group of num_heads / num_kv_heads query heads shares one K/V head.
        # When decoding, SDPA reads each cached K/V head for its whole group (`enable_gqa`); otherwise
        # the K/V heads are repeated, which every SDPA kernel takes (and training backpropagates through).
        repeats = self.num_heads // self.num_kv_heads
        grouped_sdpa = self.use_sdpa and cache is not None and repeats > 1
        if not grouped_sdpa:
            k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        dropout = self.dropout if self.training else 0.0
        if self.use_sdpa:
            # On the CPU, SDPA's bf16/fp16 kernels are several times slower than its fp32 one (forward and
            # backward of a 16 x 256-token packed batch: 191 vs 42 ms on an AMX Xeon), so the scores are
            # computed in fp32 there, outside CPU autocast; the projections around them stay in low precision.
            dtype = torch.float32 if x.device.type == "cpu" else q.dtype
            with torch.autocast("cpu", enabled=False):
                out = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=allowed,
                                                     dropout_p=dropout, is_causal=allowed is None and seq_len > 1,
                                                     enable_gqa=grouped_sdpa).to(q.dtype)
        else:  # the same computation written out
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
            if allowed is None:  # no past keys (or one query): the lower triangle
                allowed = torch.ones(seq_len, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - seq_len)
            scores = scores.masked_fill(~allowed, float("-inf"))
            weights = F.dropout(F.softmax(scores.float(), dim=-1).type_as(q), p=dropout)
            out = weights @ v
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq_len, -1))


# ---------------------------------------------------------------------------------------------
# 5. Feed-forward: SwiGLU, and a mixture of SwiGLU experts
# ---------------------------------------------------------------------------------------------

class FeedForward(nn.Module):
    """down(silu(gate(x)) * up(x)): the gate decides, per channel, how much of `up` passes."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class MoEFeedForward(nn.Module):
    """Mixture of experts: a router sends each token to its top-k experts and mixes their outputs.

    Capacity grows with the number of experts while the compute per token stays that of k MLPs.
    A balance loss (`aux_loss`) keeps the router from sending everything to a few experts.
    """

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        if config.scoring_func != "softmax":
            raise ValueError(f"unsupported MoE scoring_func {config.scoring_func!r} (only 'softmax')")
        self.top_k, self.num_experts = config.num_experts_per_tok, config.n_routed_experts
        self.normalize_topk, self.aux_alpha, self.seq_aux = config.norm_topk_prob, config.aux_loss_alpha, config.seq_aux
        self.gate = nn.Linear(config.hidden_size, self.num_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(config) for _ in range(self.num_experts))
        if config.n_shared_experts > 0:  # always-on experts that every token goes through
            self.shared_experts = nn.ModuleList(FeedForward(config) for _ in range(config.n_shared_experts))
        self.aux_loss = torch.tensor(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, hidden = x.shape
        tokens = x.reshape(-1, hidden)
        scores = F.softmax(self.gate(tokens).float(), dim=-1)  # (N, E)
        topk_weight, topk_idx = torch.topk(scores, self.top_k, dim=-1)
        if self.normalize_topk:
            topk_weight = topk_weight / (topk_weight.sum(-1, keepdim=True) + 1e-20)
        out = self.dispatch(tokens, topk_idx, topk_weight).view(batch, seq_len, hidden)
        for expert in getattr(self, "shared_experts", []):
            out = out + expert(x)
        self.aux_loss = self.balance_loss(scores, topk_idx, batch) if self.training and self.aux_alpha > 0 \
            else scores.new_zeros(())
        return out

    def dispatch(self, tokens: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """Grouped dispatch: sort the (token, slot) pairs by expert so that each expert runs once, on
        one contiguous batch of its tokens, instead of once per token.

        Every expert runs even when it got no tokens (on an empty batch): its parameters then stay in
        the autograd graph with zero gradient, so DDP's gradient all-reduce never waits for them.
        """
        flat_expert = topk_idx.reshape(-1)
        order = flat_expert.argsort(stable=True)
        token_of = order // self.top_k
        weight_of = topk_weight.reshape(-1)[order].unsqueeze(-1)
        counts = torch.bincount(flat_expert, minlength=self.num_experts).tolist()
        out = torch.zeros_like(tokens)
        start = 0
        for expert, count in zip(self.experts, counts):
            rows = slice(start, start + count)
            expert_out = expert(tokens[token_of[rows]]) * weight_of[rows]
            out.index_add_(0, token_of[rows], expert_out.to(out.dtype))
            start += count
        return out

    def balance_loss(self, scores: torch.Tensor, topk_idx: torch.Tensor, batch: int) -> torch.Tensor:
        """alpha * E * sum_e f_e * P_e, with f_e the share of routing slots that went to expert e and
        P_e its mean router probability: minimal when both are uniform. MiniMind2 measures this per
        sequence (`seq_aux`) and averages; minimind-3 over all tokens of the batch."""
        one_hot = F.one_hot(topk_idx, self.num_experts).float()  # (N, k, E)
        if self.seq_aux:
            share = one_hot.view(batch, -1, self.num_experts).mean(1)  # (B, E)
            prob = scores.view(batch, -1, self.num_experts).mean(1)
            return (share * prob).sum(-1).mean() * self.num_experts * self.aux_alpha
        share = one_hot.mean(dim=(0, 1))
        return (share * scores.mean(0)).sum() * self.num_experts * self.aux_alpha


# ---------------------------------------------------------------------------------------------
# 6. The decoder block and the model
# ---------------------------------------------------------------------------------------------

class MiniMindBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, layer_idx: int, config: MiniMindConfig):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = MoEFeedForward(config) if config.use_moe else FeedForward(config)

    def forward(self, x, cos, sin, allowed, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, allowed, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class MiniMindPreTrainedModel(PreTrainedModel):
    config_class = MiniMindConfig
    base_model_prefix = "model"
    _no_split_modules = ["MiniMindBlock"]
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)


@dataclass
class MiniMindModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    past_key_values: Cache | None = None
    aux_loss: torch.Tensor | None = None


class MiniMindModel(MiniMindPreTrainedModel):
    """The transformer trunk: token ids -> final hidden states (no vocabulary head)."""

    def __init__(self, config: MiniMindConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(MiniMindBlock(i, config) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: Cache | None = None,
                use_cache: bool = False, **kwargs) -> MiniMindModelOutput:
        batch, seq_len = input_ids.shape
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + seq_len, device=input_ids.device).expand(batch, -1)
        cos, sin = self.rotary(position_ids)
        allowed = attention_allowed(attention_mask, seq_len, past_len)
        hidden = self.dropout(self.embed_tokens(input_ids))
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, allowed, past_key_values)
        hidden = self.norm(hidden)
        aux_loss = sum((layer.mlp.aux_loss for layer in self.layers if isinstance(layer.mlp, MoEFeedForward)),
                       hidden.new_zeros((), dtype=torch.float32))
        return MiniMindModelOutput(last_hidden_state=hidden, past_key_values=past_key_values if use_cache else None,
                                   aux_loss=aux_loss)


# ---------------------------------------------------------------------------------------------
# 7. Causal language model: next-token logits, loss, and generation
# ---------------------------------------------------------------------------------------------

def next_token_nll(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "none",
                   kept: torch.Tensor | None = None) -> torch.Tensor:
    """The cross-entropy of every trainer, evaluation and this model's `loss`, written once.

    Position t predicts token t + 1, so the logits lose their last position and the labels (aligned
    with `input_ids`, -100 = no loss) their first. reduction "none": -log p(labels[:, t] | tokens < t)
    for t >= 1, shape (B, T - 1), 0 where unlabelled; "sum": their total; "mean": per labelled token.
    `kept`: the (B, T) mask the logits were kept for (`forward`'s boolean `logits_to_keep`), when
    `logits` are those positions' rows only, (kept, vocab); each is scored on the token after it
    (none after the last position), and "none" gives one value per row.
    Computed in fp32 whatever the logits' dtype, without materialising the whole log-softmax."""
    targets = labels[:, 1:]
    if kept is None:
        scores, scored_targets = logits[:, :-1].flatten(0, 1), targets.flatten()
    else:
        scores, scored_targets = logits, F.pad(targets, (0, 1), value=-100)[kept]
    nll = F.cross_entropy(scores.float(), scored_targets, ignore_index=-100, reduction=reduction)
    return nll.view_as(targets) if reduction == "none" and kept is None else nll


class MiniMindForCausalLM(MiniMindPreTrainedModel, GenerationMixin):
    """Trunk + vocabulary head. `generate` comes from transformers' GenerationMixin: greedy, sampling
    (temperature / top-p / top-k), repetition penalty, stop on eos, left-padded batches."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MiniMindConfig | None = None):
        config = config or MiniMindConfig()
        super().__init__(config)
        self.model = MiniMindModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        if config.tie_word_embeddings:
            # One matrix reads tokens in and scores them out: at 6400 x 512 that is 13% of the model.
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: Cache | None = None,
                use_cache: bool | None = None, labels: torch.Tensor | None = None,
                logits_to_keep: int | torch.Tensor = 0, loss_reduction: str = "mean",
                **kwargs) -> MoeCausalLMOutputWithPast:
        """`labels` are aligned with `input_ids` (the model shifts them); -100 marks no-loss tokens.
        `loss` is their cross-entropy (`next_token_nll`): the mean over labelled tokens, as transformers
        has it, or with `loss_reduction="sum"` the total, which the trainers divide by the labelled
        tokens of a whole optimizer step. A MoE's balance loss is returned apart in `aux_loss`.

        `logits_to_keep`: 0 = every position; n = the last n (generation needs only the last); a 1-D
        tensor of positions; or a (B, T) boolean mask, which returns the logits of the marked positions
        only, as one (marked, vocab) matrix in row-major order. Trainers pass the mask of positions whose
        next token carries loss: the vocabulary head is a small model's largest matmul, and in SFT most
        positions are prompt."""
        trunk = self.model(input_ids, attention_mask, position_ids, past_key_values, bool(use_cache))
        hidden = trunk.last_hidden_state
        if torch.is_tensor(logits_to_keep) and logits_to_keep.dtype == torch.bool:
            logits = self.lm_head(hidden[logits_to_keep])
            return MoeCausalLMOutputWithPast(aux_loss=trunk.aux_loss, logits=logits,
                                             past_key_values=trunk.past_key_values)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = next_token_nll(logits, labels, loss_reduction)
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=trunk.aux_loss, logits=logits,
                                         past_key_values=trunk.past_key_values)


# Saved directories name this file in `auto_map`, so transformers can load them with
# trust_remote_code=True anywhere; registering the classes locally too means that where this file is
# importable, `AutoConfig`/`AutoModelForCausalLM`/`AutoTokenizer` use it without asking to run remote code.
MiniMindConfig.register_for_auto_class()
MiniMindForCausalLM.register_for_auto_class("AutoModelForCausalLM")
AutoConfig.register(MiniMindConfig.model_type, MiniMindConfig, exist_ok=True)
AutoModelForCausalLM.register(MiniMindConfig, MiniMindForCausalLM, exist_ok=True)

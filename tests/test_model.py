"""The model against independent references: transformers' Llama and Qwen3, a per-token MoE loop,
full recomputation for the KV cache, one-by-one generation for left-padded batches."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from model.model_minimind import PRESETS, MiniMindConfig, MiniMindForCausalLM

TINY = PRESETS["tiny"]


def make_model(seed: int = 0, **overrides) -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(MiniMindConfig(**{**TINY, **overrides})).eval()
    # Random norms too, so a wrongly placed norm weight cannot hide behind all-ones, and sharp
    # attention (large q/k), so that positions and masks change the logits measurably.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(20)
    return model


def max_relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def random_ids(batch: int = 2, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 6400, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- parity with transformers ----------------------------------------------------------------

def llama_twin(model: MiniMindForCausalLM, yarn: bool) -> LlamaForCausalLM:
    cfg = model.config
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if yarn:
        rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": 16.0,
                "original_max_position_embeddings": 2048, "beta_fast": 32.0, "beta_slow": 1.0,
                "attention_factor": 1.0}
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, rope_parameters=rope, tie_word_embeddings=True,
        attention_bias=False, mlp_bias=False)).eval()
    llama.load_state_dict(model.state_dict(), strict=True)
    return llama


@pytest.mark.parametrize("yarn", [False, True])
def test_minimind2_layout_matches_llama(yarn):
    # Long enough that YaRN's stretched frequencies matter: positions beyond the sequence start.
    model = make_model(inference_rope_scaling=yarn, max_position_embeddings=32768)
    llama = llama_twin(model, yarn)
    ids = random_ids(length=40)
    positions = torch.arange(3000, 3040).expand(2, -1)  # far positions, where YaRN changes angles
    with torch.no_grad():
        ours = model(ids, position_ids=positions).logits
        theirs = llama(ids, position_ids=positions).logits
    assert max_relative_diff(ours, theirs) <= 1e-4


def test_yarn_changes_the_logits():
    """Guards the YaRN test above against passing because YaRN did nothing."""
    plain, stretched = make_model(), make_model(inference_rope_scaling=True, max_position_embeddings=32768)
    ids, positions = random_ids(), torch.arange(3000, 3024).expand(2, -1)
    with torch.no_grad():
        assert max_relative_diff(plain(ids, position_ids=positions).logits,
                                 stretched(ids, position_ids=positions).logits) > 1e-3


def test_minimind3_layout_matches_qwen3():
    model = make_model(num_attention_heads=4, num_key_value_heads=2, head_dim=24, intermediate_size=160,
                       rms_norm_eps=1e-6, qk_norm=True)
    cfg = model.config
    qwen = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=True, attention_bias=False, use_sliding_window=False)).eval()
    qwen.load_state_dict(model.state_dict(), strict=True)
    ids = random_ids()
    with torch.no_grad():
        assert max_relative_diff(model(ids).logits, qwen(ids).logits) <= 1e-4


def test_manual_attention_path_matches_sdpa():
    fast, manual = make_model(), make_model(flash_attn=False)
    ids = random_ids()
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding takes the masked path of both
    with torch.no_grad():
        assert max_relative_diff(manual(ids).logits, fast(ids).logits) <= 1e-5
        assert max_relative_diff(manual(ids, attention_mask=mask).logits,
                                 fast(ids, attention_mask=mask).logits) <= 1e-5


# --- MoE ---------------------------------------------------------------------------------------

def moe_reference(mlp, x: torch.Tensor) -> torch.Tensor:
    """Token by token: softmax router, top-k, renormalised weights, weighted sum, plus shared experts."""
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            token = x[b, t]
            probs = F.softmax(token @ mlp.gate.weight.T, dim=-1)
            weights, experts = probs.topk(mlp.top_k)
            if mlp.normalize_topk:
                weights = weights / weights.sum()
            for w, e in zip(weights, experts):
                out[b, t] += w * mlp.experts[int(e)](token)
            for shared in getattr(mlp, "shared_experts", []):
                out[b, t] += shared(token)
    return out


@pytest.mark.parametrize("layout", [dict(), dict(num_experts_per_tok=1, n_shared_experts=0, seq_aux=False)],
                         ids=["minimind2-top2-shared", "minimind3-top1"])
def test_moe_matches_per_token_reference(layout):
    model = make_model(use_moe=True, **layout)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 7, model.config.hidden_size)
    with torch.no_grad():
        assert max_relative_diff(mlp(x), moe_reference(mlp, x)) <= 1e-4


def test_moe_balance_loss_formulas():
    model = make_model(use_moe=True).train()
    mlp = model.model.layers[0].mlp
    x = torch.randn(3, 5, model.config.hidden_size)
    mlp(x)
    scores = F.softmax(x.reshape(-1, x.shape[-1]) @ mlp.gate.weight.T, dim=-1).view(3, 5, -1)
    chosen = scores.topk(mlp.top_k, dim=-1).indices
    num_experts, k = mlp.num_experts, mlp.top_k
    expected = 0.0
    for b in range(3):  # sequence-level: counts per sequence, normalised so uniform routing gives 1
        counts = torch.bincount(chosen[b].flatten(), minlength=num_experts).float()
        expected += (counts / (5 * k / num_experts) * scores[b].mean(0)).sum()
    expected = expected / 3 * mlp.aux_alpha
    assert torch.allclose(mlp.aux_loss, expected, rtol=1e-5)
    mlp.seq_aux = False
    mlp(x)
    counts = torch.bincount(chosen.flatten(), minlength=num_experts).float()
    expected = (counts / counts.sum() * num_experts * scores.view(-1, num_experts).mean(0)).sum() * mlp.aux_alpha
    assert torch.allclose(mlp.aux_loss, expected, rtol=1e-5)


def test_moe_every_expert_gets_a_gradient_even_when_unused():
    model = make_model(use_moe=True, n_routed_experts=8).train()
    ids = random_ids(batch=1, length=2)  # 2 tokens x top-2 cannot reach all 8 experts
    out = model(ids, labels=ids)
    (out.loss + out.aux_loss).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name


# --- cache, generation, masks --------------------------------------------------------------

def test_greedy_generate_with_cache_equals_full_recomputation():
    model = make_model()
    prompt = random_ids(batch=1, length=9)
    generated = model.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(20):  # argmax over a full forward of everything so far, no cache
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, ids)


@pytest.mark.parametrize("flash", [True, False])
def test_cached_logits_equal_full_forward_logits(flash):
    """Prefill, then a multi-token chunk on top of the cache (as in speculative or chunked decoding)."""
    model = make_model(flash_attn=flash)
    ids = random_ids(length=16)
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :10], use_cache=True)
        rest = model(ids[:, 10:], past_key_values=first.past_key_values, use_cache=True)
    assert max_relative_diff(torch.cat([first.logits, rest.logits], 1), full) <= 1e-5


@pytest.mark.parametrize("moe", [False, True])
def test_left_padded_batch_generates_like_one_by_one(moe):
    model = make_model(use_moe=moe)
    prompts = [random_ids(1, n, seed=n)[0] for n in (4, 11, 7)]
    width = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, p in enumerate(prompts):
        batch[i, width - len(p):], mask[i, width - len(p):] = p, 1
    together = model.generate(batch, attention_mask=mask, max_new_tokens=12, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[:, width:]
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert torch.equal(together[i], alone[0, len(p):]), f"prompt {i}"


def test_generate_stops_on_eos():
    model = make_model()
    prompt = random_ids(batch=1, length=5)
    first = model.generate(prompt, max_new_tokens=1, do_sample=False, eos_token_id=None, pad_token_id=0)[0, -1]
    out = model.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=int(first), pad_token_id=0)
    assert out.shape[1] == prompt.shape[1] + 1


def test_sampling_is_seeded_and_respects_top_k():
    model = make_model()
    prompt = random_ids(batch=1, length=5)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(model.generate(prompt, max_new_tokens=8, do_sample=True, temperature=0.7, top_p=0.9,
                                   top_k=5, repetition_penalty=1.1, pad_token_id=0, eos_token_id=None))
    assert torch.equal(runs[0], runs[1])
    torch.manual_seed(4)
    one = model.generate(prompt, max_new_tokens=1, do_sample=True, top_k=1, pad_token_id=0, eos_token_id=None)
    greedy = model.generate(prompt, max_new_tokens=1, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(one, greedy)


def test_position_ids_are_honoured():
    model = make_model()
    ids = random_ids(batch=1)
    with torch.no_grad():
        default = model(ids).logits
        explicit = model(ids, position_ids=torch.arange(24)[None]).logits
        shifted = model(ids, position_ids=torch.arange(100, 124)[None]).logits
    assert torch.allclose(default, explicit)
    # RoPE only sees relative positions, so a shift changes logits only by rounding...
    assert max_relative_diff(shifted, default) <= 1e-4
    # ...while a permutation of positions changes them for real.
    scrambled = model(ids, position_ids=torch.arange(24).flip(0)[None]).logits
    assert max_relative_diff(scrambled, default) > 1e-3


def test_document_ids_in_the_mask_isolate_packed_documents():
    model = make_model()
    docs = [random_ids(1, n, seed=n)[0] for n in (5, 9, 6)]
    packed = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((len(d),), i + 1) for i, d in enumerate(docs)])[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        logits = model(packed, attention_mask=doc_ids, position_ids=positions).logits[0]
        alone = torch.cat([model(d[None]).logits[0] for d in docs])
    assert max_relative_diff(logits, alone) <= 1e-5


def test_loss_ignores_minus_100_and_shifts_labels():
    model = make_model()
    ids = random_ids(batch=1, length=10)
    labels = ids.clone()
    labels[0, :6] = -100
    out = model(ids, labels=labels)
    expected = F.cross_entropy(out.logits[0, 5:9], ids[0, 6:10])
    assert torch.allclose(out.loss, expected, rtol=1e-5)


# --- sizes, keys, files ------------------------------------------------------------------------

EXPECTED_PARAMETERS = {"minimind2-small": 25_829_888, "minimind2": 104_030_976, "minimind2-moe": 145_029_760,
                       "minimind3": 63_912_192, "minimind3-moe": 198_416_640}


@pytest.mark.parametrize("preset", EXPECTED_PARAMETERS)
def test_preset_parameter_counts(preset):
    with torch.device("meta"):
        model = MiniMindForCausalLM(MiniMindConfig(**PRESETS[preset]))
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMETERS[preset]


def test_default_config_is_minimind2_small():
    cfg = MiniMindConfig()
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.vocab_size, cfg.intermediate_size, cfg.rope_theta, cfg.rms_norm_eps,
            cfg.max_position_embeddings) == (512, 8, 8, 2, 6400, 1408, 1e6, 1e-5, 32768)
    assert (cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_shared_experts, cfg.aux_loss_alpha,
            cfg.seq_aux, cfg.norm_topk_prob, cfg.scoring_func) == (4, 2, 1, 0.01, True, True, "softmax")


def original_keys(layers: int, moe: bool, qk_norm: bool, experts: int = 4, shared: int = 1) -> set[str]:
    """The original MiniMind's state-dict keys, spelled out from its naming scheme."""
    keys = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(layers):
        p = f"model.layers.{i}."
        keys |= {p + f"self_attn.{n}_proj.weight" for n in "qkvo"}
        keys |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        if qk_norm:
            keys |= {p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"}
        mlps = [p + "mlp."]
        if moe:
            keys.add(p + "mlp.gate.weight")
            mlps = [p + f"mlp.experts.{j}." for j in range(experts)]
            mlps += [p + f"mlp.shared_experts.{j}." for j in range(shared)]
        keys |= {m + f"{n}_proj.weight" for m in mlps for n in ("gate", "up", "down")}
    return keys


@pytest.mark.parametrize("preset,moe,qk,shared", [("minimind2-small", False, False, 1), ("minimind2-moe", True, False, 1),
                                                 ("minimind3", False, True, 0), ("minimind3-moe", True, True, 0)])
def test_state_dict_keys_are_the_originals_and_round_trip_strict(preset, moe, qk, shared):
    cfg = MiniMindConfig(**{**PRESETS[preset], "num_hidden_layers": 2, "hidden_size": 64,
                            "head_dim": 16 if qk else None, "intermediate_size": 96})
    model = MiniMindForCausalLM(cfg)
    state = model.state_dict()
    assert set(state) == original_keys(2, moe, qk, shared=shared)
    half = {k: v.half() for k, v in state.items()}  # the original saves half-precision .pth files
    twin = MiniMindForCausalLM(cfg)
    twin.load_state_dict(half, strict=True)
    assert twin.lm_head.weight is twin.model.embed_tokens.weight


def test_minimind3_config_json_is_recognised():
    """A minimind-3 config.json uses num_experts / router_aux_loss_coef and has no qk_norm key."""
    cfg = MiniMindConfig(hidden_size=768, num_key_value_heads=4, use_moe=True, num_experts=4,
                         num_experts_per_tok=1, router_aux_loss_coef=5e-4, moe_intermediate_size=2432,
                         rms_norm_eps=1e-6)
    assert cfg.qk_norm and cfg.n_routed_experts == 4 and cfg.n_shared_experts == 0
    assert cfg.aux_loss_alpha == 5e-4 and not cfg.seq_aux and cfg.intermediate_size == 2432
    with torch.device("meta"):
        model = MiniMindForCausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMETERS["minimind3-moe"]


def test_save_pretrained_round_trip(tmp_path):
    model = make_model(inference_rope_scaling=True)
    model.save_pretrained(tmp_path)
    loaded = MiniMindForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.inference_rope_scaling
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_bf16_autocast_forward_backward_close_to_fp32():
    model = make_model().train()
    ids = random_ids()
    fp32 = model(ids, labels=ids).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(ids, labels=ids).loss
    bf16.backward()
    assert abs(bf16.item() - fp32.item()) / fp32.item() < 2e-2
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

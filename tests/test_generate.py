"""model/generate.py against independent references: transformers' `generate` token for token
(MiniMind2 dense and MoE, the minimind-3 layout, a transformers Qwen2), transformers' logits
warpers and repetition penalty for the sampling distribution, and each sequence decoded alone for
sequences that join and leave a running batch."""

from pathlib import Path

import pytest
import torch
from transformers import (AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, RepetitionPenaltyLogitsProcessor,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from model.generate import Decoder, Sampling, Sequence, TextStream, choose, generate, penalize, warp
from model.model_minimind import PRESETS, MiniMindConfig, MiniMindForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["<|im_start|>user\n你好，请介绍一下你自己。<|im_end|>\n<|im_start|>assistant\n",
           "The sky is blue because",
           "1 + 1 ="]
LAYOUTS = {"dense": {}, "moe": {"use_moe": True},
           "minimind3": dict(head_dim=24, qk_norm=True, rms_norm_eps=1e-6, intermediate_size=160)}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(REPO_ROOT / "model")


def make_model(layout: str, seed: int = 0) -> MiniMindForCausalLM:
    """A random tiny model; wide initial weights, so that greedy decoding writes varied tokens."""
    torch.manual_seed(seed)
    return MiniMindForCausalLM(MiniMindConfig(**PRESETS["tiny"], **LAYOUTS[layout], initializer_range=0.2)).eval()


def left_padded(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    return batch.input_ids, batch.attention_mask


def transformers_greedy(model, input_ids, attention_mask, max_new_tokens: int, eos: int | None) -> torch.Tensor:
    return model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=eos, pad_token_id=0)


# --- greedy parity ------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("static_shapes", [False, True])
def test_greedy_equals_transformers_generate(tokenizer, layout, static_shapes):
    """Each prompt alone, then all three in one left-padded batch of mixed lengths; `static_shapes`
    is the CUDA-graph step (all slots, whole capacity) run eagerly."""
    model = make_model(layout)
    for prompt in PROMPTS:
        ids, mask = left_padded(tokenizer, [prompt])
        expected = transformers_greedy(model, ids, mask, 24, eos=None)
        assert torch.equal(generate(model, ids, mask, max_new_tokens=24, static_shapes=static_shapes), expected)
    ids, mask = left_padded(tokenizer, PROMPTS)
    assert len(set(mask.sum(-1).tolist())) == 3
    expected = transformers_greedy(model, ids, mask, 24, eos=None)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=24, static_shapes=static_shapes), expected)


def test_rows_finish_on_their_own_as_in_transformers(tokenizer):
    """A stop id that one row writes early ends that row (padding after it) and not the others."""
    model = make_model("dense")
    ids, mask = left_padded(tokenizer, PROMPTS)
    free_run = transformers_greedy(model, ids, mask, 16, eos=None)
    stop = int(free_run[1, ids.shape[1] + 4])
    expected = transformers_greedy(model, ids, mask, 16, eos=stop)
    ours = generate(model, ids, mask, max_new_tokens=16, stop_ids=(stop,))
    assert torch.equal(ours, expected)
    assert (ours[1, ids.shape[1] + 5:] == 0).all() and ours.shape[1] == ids.shape[1] + 16


def test_a_transformers_model_decodes_through_the_same_cache(tokenizer):
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=6400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)).eval()
    ids, mask = left_padded(tokenizer, PROMPTS)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=16), transformers_greedy(model, ids, mask, 16, eos=None))


def test_sequences_that_join_and_leave_a_running_batch_decode_as_alone(tokenizer):
    """Continuous batching: B joins while A runs, A is cancelled (C's slot moves into its place),
    C joins later; each sequence's tokens equal those it gets decoded alone."""
    model = make_model("dense")
    prompts = [tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]
    alone = [generate(model, torch.tensor([p]), max_new_tokens=12)[0, len(p):].tolist() for p in prompts]
    decoder = Decoder(model, slots=3, capacity=64)
    a, b, c = (Sequence(p, max_new_tokens=12) for p in prompts)
    decoder.add([a])
    for _ in range(3):
        decoder.step()
    decoder.add([b, c])
    decoder.step()
    decoder.finish(a)
    assert decoder.running == [c, b] and a.finish_reason == "cancelled" and a.tokens == alone[0][:5]
    while decoder.running:
        decoder.step()
    assert (b.tokens, c.tokens) == (alone[1], alone[2]) and b.finish_reason == c.finish_reason == "length"
    assert decoder.free_slots == 3


def test_a_sequence_longer_than_the_cache_is_refused():
    decoder = Decoder(make_model("dense"), slots=1, capacity=8)
    with pytest.raises(ValueError, match="does not fit"):
        decoder.add([Sequence([5] * 4, max_new_tokens=5)])


# --- sampling -----------------------------------------------------------------------------------

def transformers_probabilities(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    scores = TemperatureLogitsWarper(temperature)(None, logits)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(-1)


SETTINGS = [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 50, 1.0), (1.0, 0, 0.9), (0.8, 40, 0.85), (1.0, 1, 1.0), (2.0, 0, 0.3)]


def test_warped_probabilities_equal_transformers_warpers():
    """Each row its own setting (as in a server batch); each row against transformers' warpers."""
    logits = torch.randn(len(SETTINGS), 6400, generator=torch.Generator().manual_seed(0)) * 3
    temperature, top_k, top_p = (torch.tensor(column) for column in zip(*SETTINGS))
    probs = warp(logits, temperature.float(), top_k, top_p.float())
    for row, (t, k, p) in enumerate(SETTINGS):
        expected = transformers_probabilities(logits[row:row + 1], t, k, p)[0]
        assert torch.equal(probs[row] > 0, expected > 0), SETTINGS[row]
        torch.testing.assert_close(probs[row], expected, atol=1e-6, rtol=1e-5)


def test_repetition_penalty_equals_transformers():
    logits = torch.randn(2, 6400, generator=torch.Generator().manual_seed(1))
    history = torch.tensor([[5, 17, 17, 300], [8, 9, 10, 6000]])
    seen = torch.zeros(2, 6400, dtype=torch.bool).scatter_(1, history, True)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    torch.testing.assert_close(penalize(logits, seen, torch.tensor([1.3, 1.3])), expected)


def test_drawn_tokens_follow_the_warped_distribution():
    """20,000 draws of `choose` land on each token as often as transformers' probabilities say."""
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(2)) * 2
    expected = transformers_probabilities(logits, 0.8, 20, 0.9)[0]
    draws = 20_000
    settings = [Sampling(temperature=0.8, top_k=20, top_p=0.9)] * draws
    seen = torch.zeros(draws, 40, dtype=torch.bool)
    tokens = choose(logits.expand(draws, -1), settings, seen, [torch.Generator().manual_seed(3)] + [None] * (draws - 1))
    frequency = torch.bincount(tokens, minlength=40).float() / draws
    assert torch.equal(frequency > 0, expected > 0)
    assert (frequency - expected).abs().max() < 4 * (expected * (1 - expected) / draws).sqrt().max() + 1e-3


def test_a_fixed_seed_gives_the_same_tokens_whatever_runs_beside_it(tokenizer):
    model = make_model("dense")
    prompt = tokenizer(PROMPTS[0], add_special_tokens=False).input_ids
    sampling = Sampling(temperature=1.0, top_p=0.95)

    def seeded(seed: int, neighbours: int = 0) -> list[int]:
        decoder = Decoder(model, slots=1 + neighbours, capacity=64)
        mine = Sequence(prompt, 16, sampling, generator=torch.Generator().manual_seed(seed))
        decoder.add([mine] + [Sequence(prompt, 16, sampling) for _ in range(neighbours)])
        while decoder.running:
            decoder.step()
        return mine.tokens

    assert seeded(7) == seeded(7) == seeded(7, neighbours=2)
    assert seeded(7) != seeded(8)


# --- text ---------------------------------------------------------------------------------------

def test_text_stream_pieces_make_the_decoded_text_and_stop_before_a_stop_string(tokenizer):
    tokens = tokenizer("天空为什么是蓝色的？因为瑞利散射。Blue!", add_special_tokens=False).input_ids + [2]
    whole = tokenizer.decode(tokens, skip_special_tokens=True)

    def pieces(stop: list[str]) -> tuple[list[str], bool]:
        stream, taken = TextStream(tokenizer, stop), []
        for n in range(1, len(tokens) + 1):
            stream.feed(tokens[:n])
            taken.append(stream.take())
            if stream.stopped:
                break
        stream.finish(tokens)
        return taken + [stream.take()], stream.stopped

    taken, stopped = pieces([])
    assert "".join(taken) == whole and not stopped
    assert all("\ufffd" not in piece for piece in taken)  # never half a character
    taken, stopped = pieces(["never", "瑞利"])
    assert "".join(taken) == whole[:whole.index("瑞利")] and stopped

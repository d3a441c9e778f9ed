"""Datasets and batches: assistant-only labels, `path:line:` errors, lazy reading, packing that trains
exactly like one document at a time, and batch iteration that resumes to the exact batch."""
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from dataset.lm_dataset import (DPODataset, JsonlFile, PackedBatches, PretrainDataset, RLAIFDataset,
                                SFTDataset, count_loss_tokens)
from model.model_minimind import PRESETS, MiniMindConfig, MiniMindForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[1]
GENERATION_PROMPT = "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(REPO_ROOT / "model")


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def pretrain_file(tmp_path: Path, n: int = 40) -> Path:
    """Documents of varied lengths (4 to ~60 tokens), each text unique."""
    words = "the cat sat on a mat while seven dogs ran far away from 小猫 and 大狗".split()
    texts = [f"doc {i}: " + " ".join(words[(i * 7 + k) % len(words)] for k in range(2 + (i * 13) % 24))
             for i in range(n)]
    return write_jsonl(tmp_path / "pretrain.jsonl", [{"text": t} for t in texts])


def labelled_spans(tokenizer, input_ids: torch.Tensor, labels: torch.Tensor) -> list[str]:
    """The decoded runs of consecutive labelled tokens (checking labels equal the ids they label)."""
    learned = (labels != -100).tolist()
    assert torch.equal(labels[labels != -100], input_ids[labels != -100])
    spans, start = [], None
    for k, on in enumerate(learned + [False]):
        if on and start is None:
            start = k
        if not on and start is not None:
            spans.append(tokenizer.decode(input_ids[start:k]))
            start = None
    return spans


# ---------------------------------------------------------------------------------------------
# Items
# ---------------------------------------------------------------------------------------------

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
CONVERSATION = [
    {"role": "system", "content": "You are MiniMind.", "functions": json.dumps(TOOLS)},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "Let me look.", "reasoning_content": "Need the tool.",
     "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]},
    {"role": "tool", "content": "{\"temp\": 21}"},
    {"role": "assistant", "content": "It is 21 °C in Paris."},
    {"role": "user", "content": "谢谢"},
    {"role": "assistant", "content": "不客气！"},
]


def test_sft_labels_are_exactly_the_assistant_replies(tmp_path, tokenizer):
    dataset = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", [{"conversations": CONVERSATION}]), tokenizer, 1024)
    item = dataset[0]
    text = tokenizer.decode(item["input_ids"])
    assert text == tokenizer.apply_chat_template([{k: v for k, v in m.items() if k != "functions"}
                                                  for m in CONVERSATION], tools=TOOLS, tokenize=False)
    assert "<tools>" in text and "get_weather" in text  # the system message's functions became tools
    assert labelled_spans(tokenizer, item["input_ids"], item["labels"]) == [
        "<think>\nNeed the tool.\n</think>\n\nLet me look.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is 21 °C in Paris.<|im_end|>",
        "不客气！<|im_end|>",
    ]


RECALL = [
    {"role": "system", "content": "You are MiniMind."},
    {"role": "user", "content": "我有 7 个苹果。"}, {"role": "assistant", "content": "好的，我记住了。"},
    {"role": "user", "content": "今天天气怎么样？"}, {"role": "assistant", "content": "晴天。"},
    {"role": "user", "content": "又买了 5 个苹果，现在一共有几个苹果？"}, {"role": "assistant", "content": "12"},
]


def test_sft_query_utterance_makes_each_reply_an_example_on_its_compacted_history(tmp_path, tokenizer):
    """One item per reply, rendered by the chat template from the history fit_history would send,
    and labels on that reply (with its <|im_end|>) and nothing else."""
    path = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": RECALL}, {"conversations": CONVERSATION[1:5]}])
    dataset = SFTDataset(path, tokenizer, 1024, history_mode="query_utterance", history_utterances=1)
    system, question = RECALL[0], lambda text: {"role": "user", "content": text}
    tool_call = ('<think>\nNeed the tool.\n</think>\n\nLet me look.\n<tool_call>\n'
                 '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    expected = [  # (the messages the template renders, the one reply learned)
        ([system, RECALL[1], RECALL[2]], "好的，我记住了。"),
        ([system, question("我有 7 个苹果。\n今天天气怎么样？"), RECALL[4]], "晴天。"),  # nothing overlaps: the most recent
        ([system, question("我有 7 个苹果。\n又买了 5 个苹果，现在一共有几个苹果？"), RECALL[6]], "12"),  # the apples, not the weather
        (CONVERSATION[1:3], tool_call), (CONVERSATION[1:5], "It is 21 °C in Paris."),  # a call, then the answer to its result
    ]
    assert len(dataset) == len(expected)
    for i, (messages, reply) in enumerate(expected):
        assert tokenizer.decode(dataset[i]["input_ids"]) == tokenizer.apply_chat_template(messages, tokenize=False)
        assert labelled_spans(tokenizer, dataset[i]["input_ids"], dataset[i]["labels"]) == [reply + "<|im_end|>"]


def test_sft_full_history_mode_is_the_conversation_whole(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": RECALL}, {"conversations": CONVERSATION}])
    default, full = SFTDataset(path, tokenizer, 1024), SFTDataset(path, tokenizer, 1024, history_mode="full")
    assert len(default) == len(full) == 2
    for i in range(2):
        assert all(torch.equal(default[i][key], full[i][key]) for key in ("input_ids", "labels"))
    assert len(labelled_spans(tokenizer, full[0]["input_ids"], full[0]["labels"])) == 3


def test_sft_truncates_to_max_length(tmp_path, tokenizer):
    dataset = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", [{"conversations": CONVERSATION}]), tokenizer, 40)
    item = dataset[0]
    assert len(item["input_ids"]) == len(item["labels"]) == 40


def test_dpo_labels_cover_each_sides_answer(tmp_path, tokenizer):
    question = {"role": "user", "content": "Calculate 3 × 4."}
    record = {"chosen": [question, {"role": "assistant", "content": "12"}],
              "rejected": [question, {"role": "assistant", "content": "14, I think"}]}
    item = DPODataset(write_jsonl(tmp_path / "dpo.jsonl", [record]), tokenizer, 512)[0]
    assert labelled_spans(tokenizer, item["chosen_input_ids"], item["chosen_labels"]) == ["12<|im_end|>"]
    assert labelled_spans(tokenizer, item["rejected_input_ids"], item["rejected_labels"]) == ["14, I think<|im_end|>"]
    assert torch.equal(item["input_ids"], item["chosen_input_ids"])


def test_rlaif_prompt_ends_with_generation_prompt(tmp_path, tokenizer):
    record = {"conversations": [{"role": "user", "content": "What is 6 plus 8?"},
                                {"role": "assistant", "content": "14"}], "answer": "14"}
    path = write_jsonl(tmp_path / "rl.jsonl", [record])
    item = RLAIFDataset(path, tokenizer, 256)[0]
    assert item["prompt"].endswith("<|im_start|>user\nWhat is 6 plus 8?<|im_end|>\n" + GENERATION_PROMPT)
    assert tokenizer.decode(item["input_ids"]) == item["prompt"]
    assert (item["labels"] == -100).all()
    assert (item["answer"], item["reference"]) == ("14", "14")
    no_thinking = RLAIFDataset(path, tokenizer, 256, enable_thinking=False)[0]
    assert no_thinking["prompt"].endswith(GENERATION_PROMPT + "<think>\n\n</think>\n\n")


def test_rlaif_long_history_drops_oldest_turns(tmp_path, tokenizer):
    history = [{"role": "system", "content": "Be brief."}]
    for turn in range(6):
        history += [{"role": "user", "content": f"question {turn} " + "blah " * 10},
                    {"role": "assistant", "content": f"answer {turn} " + "blah " * 10}]
    history.append({"role": "user", "content": "last question"})
    item = RLAIFDataset(write_jsonl(tmp_path / "rl.jsonl", [{"conversations": history}]), tokenizer, 200)[0]
    prompt = item["prompt"]
    assert len(item["input_ids"]) <= 200
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert prompt.endswith("<|im_start|>user\nlast question<|im_end|>\n" + GENERATION_PROMPT)
    assert "question 0" not in prompt and "question 5" in prompt  # the oldest went, the newest stayed


@pytest.mark.parametrize("line, line_no, reason", [
    ('{"text": "ok"', 2, "invalid JSON"),
    ('{"txt": "typo"}', 2, "missing field 'text'"),
    ('["text"]', 2, "expected a JSON object"),
])
def test_bad_pretrain_line_names_path_and_line(tmp_path, tokenizer, line, line_no, reason):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + '\n{"text": "also fine"}\n', encoding="utf-8")
    dataset = PretrainDataset(path, tokenizer)
    dataset[0], dataset[2]  # the good lines around it still load
    with pytest.raises(ValueError, match=re.escape(f"{path}:{line_no}: {reason}")):
        dataset[line_no - 1]
    with pytest.raises(ValueError, match=re.escape(f"{path}:{line_no}:")):
        dataset.file.check_all()


def test_bad_conversation_line_names_path_and_line(tmp_path, tokenizer):
    good = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    wrong_role = {"conversations": [{"role": "human", "content": "hi"}]}
    missing = {"messages": []}
    path = write_jsonl(tmp_path / "sft.jsonl", [good, good, wrong_role, missing])
    dataset = SFTDataset(path, tokenizer)
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: conversations[0] has role 'human'")):
        dataset[2]
    with pytest.raises(ValueError, match=re.escape(f"{path}:4: missing field 'conversations'")):
        dataset[3]
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: missing field 'chosen'")):
        DPODataset(path, tokenizer)[1]


def test_lazy_index_handles_crlf_unicode_and_trailing_blank_lines(tmp_path):
    records = [{"text": f"第 {i} 行 — ünïcödé 🙂 line {i}"} for i in range(50)]
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(("\r\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\r\n\r\n  \n").encode())
    jsonl = JsonlFile(path)
    assert len(jsonl) == 50
    assert jsonl.line_starts.dtype.kind == "i" and len(jsonl.line_starts) == 51  # offsets, not lines
    for i in [49, 0, 17, 33, -1]:
        assert jsonl[i] == records[i]
    with pytest.raises(IndexError):
        jsonl[50]


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------

def documents_of(batch: dict) -> list[tuple[int, ...]]:
    """The token ids of every document in a batch, packed (doc ids) or padded (1/0 mask)."""
    documents = []
    for ids, doc_ids in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
        for doc_id in sorted(set(doc_ids) - {0}):
            documents.append(tuple(t for t, d in zip(ids, doc_ids) if d == doc_id))
    return documents


def test_packed_row_loss_equals_sum_of_document_losses(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(**PRESETS["tiny"])).eval()
    dataset = PretrainDataset(pretrain_file(tmp_path, 12), tokenizer, max_length=64)
    batch = next(iter(PackedBatches(dataset, batch_size=1, max_length=128, shuffle=False)))
    documents = documents_of(batch)
    assert len(documents) >= 3 and batch["attention_mask"].max() == len(documents)

    def summed_loss(input_ids, labels, **kwargs):
        logits = model(input_ids, **kwargs).logits
        return F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")

    with torch.no_grad():
        packed = summed_loss(batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"],
                             position_ids=batch["position_ids"])
        one_by_one = sum(summed_loss(torch.tensor([doc]), torch.tensor([doc])) for doc in documents)
    assert count_loss_tokens(batch["labels"]) == sum(len(doc) - 1 for doc in documents)
    assert abs(packed - one_by_one) <= 1e-4 * abs(one_by_one)


def test_packed_rows_restart_positions_and_mask_document_starts(tmp_path, tokenizer):
    dataset = PretrainDataset(pretrain_file(tmp_path), tokenizer, max_length=64)
    batch = next(iter(PackedBatches(dataset, batch_size=4, max_length=96, seed=3)))
    assert batch["input_ids"].shape == (4, 96)
    for mask, positions, labels in zip(batch["attention_mask"], batch["position_ids"], batch["labels"]):
        starts = torch.nonzero(torch.diff(mask, prepend=mask.new_zeros(1)) > 0).flatten()
        assert positions[starts].eq(0).all() and labels[starts].eq(-100).all()
        assert labels[mask == 0].eq(-100).all()
        real = mask > 0
        assert real[:real.sum()].all()  # documents first, padding at the end
    assert (batch["attention_mask"] > 0).float().mean() > 0.8  # rows are well filled


def test_padded_mode_reproduces_minimind_rows(tmp_path, tokenizer):
    texts = ["short text", "a much longer text " * 20]
    dataset = PretrainDataset(write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in texts]), tokenizer, 32)
    batch = next(iter(PackedBatches(dataset, batch_size=2, max_length=32, pack=False, shuffle=False)))
    for row, text in enumerate(texts):
        # The original: bos + text cut to max_length - 2 + eos, then padded; labels -100 on padding.
        ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False).input_ids[:30] + [
            tokenizer.eos_token_id]
        expected = torch.tensor(ids + [tokenizer.pad_token_id] * (32 - len(ids)))
        assert torch.equal(batch["input_ids"][row], expected)
        assert torch.equal(batch["labels"][row], torch.where(torch.arange(32) < len(ids), expected, -100))
        assert torch.equal(batch["attention_mask"][row], (torch.arange(32) < len(ids)).long())
        assert torch.equal(batch["position_ids"][row], torch.arange(32))


def run_epochs(loader: PackedBatches, epochs: int) -> list[dict]:
    return [batch for _ in range(loader.epoch, epochs) for batch in loader]


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("rank, world_size", [(0, 1), (1, 2)])
def test_resume_continues_with_identical_batches(tmp_path, tokenizer, pack, rank, world_size):
    dataset = PretrainDataset(pretrain_file(tmp_path), tokenizer, max_length=48)

    def loader():
        return PackedBatches(dataset, batch_size=2, max_length=64, pack=pack, seed=7, rank=rank,
                             world_size=world_size, buffer_size=6)

    def interrupted_run(stops: list[int]) -> list[dict]:
        """Two epochs, stopped after each count of batches in `stops` and resumed in a fresh loader."""
        batches, current = [], loader()
        for stop in stops:
            iterator = (batch for _ in range(current.epoch, 2) for batch in current)
            batches += [next(iterator) for _ in range(stop - len(batches))]
            state = json.loads(json.dumps(current.state_dict()))  # plain ints, survives any serialisation
            saved_buffers.append(state["buffer"])
            current = loader()
            current.load_state_dict(state)
        return batches + run_epochs(current, 2)

    saved_buffers = []
    uninterrupted = run_epochs(loader(), 2)
    per_epoch = len(run_epochs(loader(), 1))
    for stops in ([1, 2, 3], [per_epoch - 1], [per_epoch], [per_epoch - 1, per_epoch + 1]):  # around the boundary
        assert same_batches(interrupted_run(stops), uninterrupted)
    assert any(saved_buffers) or not pack  # the look-ahead buffer was part of a saved state


@pytest.mark.parametrize("pack", [True, False])
def test_ranks_share_an_epoch_without_loss_or_duplicates(tmp_path, tokenizer, pack):
    dataset = PretrainDataset(pretrain_file(tmp_path), tokenizer, max_length=48)
    all_documents = sorted(tuple(dataset[i]["input_ids"].tolist()) for i in range(len(dataset)))
    per_rank = [[doc for batch in PackedBatches(dataset, 3, 64, pack=pack, seed=1, rank=r, world_size=2)
                 for doc in documents_of(batch)] for r in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == all_documents


def test_next_epoch_is_a_new_order(tmp_path, tokenizer):
    dataset = PretrainDataset(pretrain_file(tmp_path), tokenizer, max_length=48)
    loader = PackedBatches(dataset, 4, 64, pack=False, seed=0)
    first, second = list(loader), list(loader)
    assert loader.epoch == 2 and not same_batches(first, second)
    loader.set_epoch(0)
    assert same_batches(list(loader), first)


def test_worker_processes_give_identical_batches(tmp_path, tokenizer):
    dataset = SFTDataset(REPO_ROOT / "dataset" / "demo" / "sft.jsonl", tokenizer, max_length=128)
    dataset.file.line_starts = dataset.file.line_starts[:61]  # the first 60 conversations
    in_process = list(PackedBatches(dataset, 4, 128, seed=2))
    with_workers = list(PackedBatches(dataset, 4, 128, seed=2, num_workers=2))
    assert same_batches(in_process, with_workers)


@pytest.mark.parametrize("pack", [True, False])
def test_estimated_batches_per_epoch(tmp_path, tokenizer, pack):
    dataset = PretrainDataset(pretrain_file(tmp_path, 200), tokenizer, max_length=48)
    loader = PackedBatches(dataset, 4, 96, pack=pack)
    actual = len(list(loader))
    if pack:
        assert abs(loader.estimated_batches_per_epoch(sample_size=100) - actual) <= 0.15 * actual
    else:
        assert loader.estimated_batches_per_epoch() == actual == 50


def test_dpo_and_rlaif_batches_pad(tmp_path, tokenizer):
    question = {"role": "user", "content": "Calculate 3 × 4."}
    pairs = [{"chosen": [question, {"role": "assistant", "content": "12" * n}],
              "rejected": [question, {"role": "assistant", "content": "no"}]} for n in (1, 5)]
    dpo = next(iter(PackedBatches(DPODataset(write_jsonl(tmp_path / "d.jsonl", pairs), tokenizer), 2, 512,
                                  shuffle=False)))
    assert dpo["chosen_input_ids"].shape == dpo["rejected_input_ids"].shape == dpo["chosen_labels"].shape
    assert dpo["chosen_attention_mask"][1].all() and not dpo["rejected_attention_mask"][1].all()
    prompts = [{"conversations": [{"role": "user", "content": "hi " * n}], "answer": str(n)} for n in (1, 9)]
    rl = next(iter(PackedBatches(RLAIFDataset(write_jsonl(tmp_path / "r.jsonl", prompts), tokenizer), 2, 512,
                                 shuffle=False)))
    assert rl["attention_mask"][0, 0] == 0 and rl["attention_mask"][:, -1].all()  # left padding
    assert rl["answer"] == ["1", "9"] and all(p.endswith(GENERATION_PROMPT) for p in rl["prompt"])


def _count_batches_on_rank(rank: int, init_file: str, data_path: str, tokenizer, counts) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        dataset = PretrainDataset(data_path, tokenizer, max_length=64)
        counts[rank] = sum(1 for _ in PackedBatches(dataset, 1, 64, shuffle=False, rank=rank, world_size=2))
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_ranks_end_the_epoch_together(tmp_path, tokenizer):
    # Without shuffling rank 0 takes the even lines (long) and rank 1 the odd ones (short): rank 0 has
    # many more packed rows, yet both must stop at the same batch or a gradient all-reduce would hang.
    records = [{"text": "long text " * 20 if i % 2 == 0 else "short"} for i in range(16)]
    path = write_jsonl(tmp_path / "p.jsonl", records)
    alone = [sum(1 for _ in PackedBatches(PretrainDataset(path, tokenizer, 64), 1, 64, shuffle=False, rank=r,
                                          world_size=2)) for r in range(2)]
    assert alone[0] > alone[1]
    counts = torch.multiprocessing.get_context("fork").Manager().dict()
    torch.multiprocessing.start_processes(_count_batches_on_rank, nprocs=2, start_method="fork",
                                          args=(str(tmp_path / "init"), str(path), tokenizer, counts))
    assert counts[0] == counts[1] == alone[1]

"""Reasoning: teach the model to think in a `<think>...</think>` block before it answers.

    python trainer/train_reason.py                    # from out/dpo_512.pth on dataset/r1_mix_1024.jsonl (or the demo data)
    python trainer/train_reason.py --tag_weight 1     # plain SFT on the reasoning data

This is SFT on replies written as `<think>\\nsteps\\n</think>\\n\\nanswer` (or R1's older
`<think>...</think><answer>...</answer>`): the same next-token loss on the assistant's tokens, with one
change. A small model imitates the content of the steps long before it reliably emits the tags around
them, so the tokens of the tags weigh `--tag_weight` times more (MiniMind used 10):

    loss = sum_t w_t * CE_t / (labelled tokens),   w_t = tag_weight on the tokens of a tag, else 1

A tag is several tokens (`<think>` is `<`, `th`, `ink`, `>`), so the tags are found as whole token
sequences in the labels. The original marked every token that equals ANY piece of a tag, so a `<` in
"3 < 5" or the "think" of "I think" were weighted too; here only a complete tag is. The sum is divided
by the labelled tokens as in SFT (the original divided by the sum of the weights), so `--tag_weight 1`
is exactly SFT; `ce` in the metrics is the unweighted per-token cross-entropy.

At inference the chat template's `enable_thinking` switch chooses: on (or unset), the generation prompt
ends at `<|im_start|>assistant\\n` and the trained model opens `<think>` itself; off, the template
appends an empty `<think>\\n\\n</think>\\n\\n` and the model answers at once
(`python eval_llm.py --weight reason --open_thinking 0`).
"""

from functools import partial

import torch

from dataset.lm_dataset import SFTDataset
from model.chat_format import THINK_CLOSE, THINK_OPEN
from model.model_minimind import next_token_nll
from trainer import engine

TAGS = (THINK_OPEN, THINK_CLOSE, "<answer>", "</answer>")


def tag_token_ids(tokenizer, tags: tuple[str, ...] = TAGS) -> list[list[int]]:
    return [tokenizer(tag, add_special_tokens=False)["input_ids"] for tag in tags]


def tag_mask(labels: torch.Tensor, tag_sequences: list[list[int]]) -> torch.Tensor:
    """True on every token of every complete occurrence of a tag's token sequence in `labels` (B, T)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    for sequence in tag_sequences:
        length = len(sequence)
        if length == 0 or labels.shape[1] < length:
            continue
        windows = labels.unfold(1, length, 1)  # (B, T - length + 1, length): every run of `length` labels
        starts = (windows == torch.tensor(sequence, device=labels.device)).all(dim=-1)
        for offset in range(length):
            mask[:, offset:offset + starts.shape[1]] |= starts
    return mask


def reasoning_step(model: torch.nn.Module, batch: dict, tag_sequences: list[list[int]],
                   tag_weight: float) -> engine.LossOutput:
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                position_ids=batch.get("position_ids"))
    token_nll = next_token_nll(out.logits, batch["labels"])  # (B, T - 1), 0 where unlabelled
    weights = 1 + (tag_weight - 1) * tag_mask(batch["labels"], tag_sequences)[:, 1:].float()
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    return engine.LossOutput(loss_sum=(weights * token_nll).sum(), count=labelled, aux_loss=out.aux_loss,
                             metrics={"ce": token_nll.sum().item() / max(labelled, 1)})


def main() -> None:
    parser = engine.stage_parser(__doc__, save_weight="reason", from_weight="dpo", learning_rate=1e-6, epochs=1,
                                 batch_size=8, max_seq_len=720, data_file="r1_mix_1024.jsonl", save_interval=100)
    engine.add_packing_flag(parser)
    parser.add_argument("--tag_weight", type=float, default=10.0,
                        help="loss weight of the tokens of <think>, </think>, <answer>, </answer> (1 = plain SFT)")
    args = parser.parse_args()
    tag_sequences = tag_token_ids(engine.load_tokenizer(args.tokenizer_path))
    step = partial(reasoning_step, tag_sequences=tag_sequences, tag_weight=args.tag_weight)
    engine.train_language_model(args, SFTDataset, "r1_mix_1024.jsonl", "reason.jsonl", loss_fn=step)


if __name__ == "__main__":
    main()

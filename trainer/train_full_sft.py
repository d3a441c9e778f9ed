"""Supervised fine-tuning: teach the pretrained model to answer in the chat format.

    python trainer/train_full_sft.py      # from out/pretrain_512.pth on dataset/sft_mini_512.jsonl (or the demo data)
    python trainer/train_full_sft.py --history_mode query_utterance   # each reply on the compacted history it is asked with

Conversations are rendered with the chat template; the loss is the same next-token cross-entropy as
pretraining, but only the assistant replies (and their closing <|im_end|>) carry labels
(`SFTDataset`), so the model learns to answer rather than to imitate its users. All weights train.

`--history_mode` shapes the history each reply is trained on, as `eval_llm.py`, the server and the web
demo shape it at inference (`model/chat_format.py`'s `fit_history`): `full` trains each conversation
whole (MiniMind's data, unchanged); `query_utterance` and `none` make every assistant reply an example
of its own, after the history that mode would send, with labels on that reply only.
"""

from dataset.lm_dataset import SFTDataset
from model.cli import add_history_args
from trainer import engine


def main() -> None:
    parser = engine.stage_parser(__doc__, save_weight="full_sft", from_weight="pretrain", learning_rate=1e-6, epochs=2,
                                 batch_size=16, max_seq_len=340, data_file="sft_mini_512.jsonl", save_interval=100)
    engine.add_packing_flag(parser)
    add_history_args(parser.add_argument_group("history"),
                     full="each conversation is one example, every reply learned after the whole history before it",
                     none="each reply is an example after the system prompt and its own turn only")
    args = parser.parse_args()
    engine.train_language_model(args, SFTDataset, "sft_mini_512.jsonl", "sft.jsonl",
                                dataset_options={"history_mode": args.history_mode,
                                                 "history_utterances": args.history_utterances})


if __name__ == "__main__":
    main()

"""Supervised fine-tuning: teach the pretrained model to answer in the chat format.

    python trainer/train_full_sft.py      # from out/pretrain_512.pth on dataset/sft_mini_512.jsonl (or the demo data)

Conversations are rendered with the chat template; the loss is the same next-token cross-entropy as
pretraining, but only the assistant replies (and their closing <|im_end|>) carry labels
(`SFTDataset`), so the model learns to answer rather than to imitate its users. All weights train.
"""

from dataset.lm_dataset import SFTDataset
from trainer import engine


def main() -> None:
    parser = engine.stage_parser(__doc__, save_weight="full_sft", from_weight="pretrain", learning_rate=1e-6, epochs=2,
                                 batch_size=16, max_seq_len=340, data_file="sft_mini_512.jsonl", save_interval=100)
    engine.add_packing_flag(parser)
    args = parser.parse_args()
    engine.train_language_model(args, SFTDataset, "sft_mini_512.jsonl", "sft.jsonl")


if __name__ == "__main__":
    main()

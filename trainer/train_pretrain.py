"""Pretraining: learn to predict the next token of plain text.

    python trainer/train_pretrain.py                       # MiniMind2-Small on dataset/pretrain_hq.jsonl (or the demo data)
    torchrun --nproc_per_node 2 trainer/train_pretrain.py  # the same on two processes

Every token of every document carries loss: the summed cross-entropy of predicting token t+1 from
tokens 1..t (`engine.causal_lm_loss`), averaged over all tokens of an optimizer step. Documents are
packed into full rows (`--pack 1`); the attention mask keeps them from seeing each other, so packing
changes the speed, not the objective.
"""

from dataset.lm_dataset import PretrainDataset
from trainer import engine


def main() -> None:
    parser = engine.stage_parser(__doc__, save_weight="pretrain", from_weight="none", learning_rate=5e-4, epochs=1,
                                 batch_size=32, accumulation_steps=8, max_seq_len=340, data_file="pretrain_hq.jsonl",
                                 save_interval=100)
    engine.add_packing_flag(parser)
    args = parser.parse_args()
    engine.train_language_model(args, PretrainDataset, "pretrain_hq.jsonl", "pretrain.jsonl")


if __name__ == "__main__":
    main()

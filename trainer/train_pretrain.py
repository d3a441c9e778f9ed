"""Pretraining: learn to predict the next token of plain text.

    python trainer/train_pretrain.py                       # MiniMind2-Small on dataset/pretrain_hq.jsonl (or the demo data)
    torchrun --nproc_per_node 2 trainer/train_pretrain.py  # the same on two processes

Every token of every document carries loss. Documents are packed into full rows (`--pack 1`); the
attention mask keeps them from seeing each other, so packing changes the speed, not the objective.
"""

from dataset.lm_dataset import PretrainDataset
from trainer import engine


def main() -> None:
    parser = engine.stage_parser(__doc__, save_weight="pretrain", from_weight="none", learning_rate=5e-4, epochs=1,
                                 batch_size=32, accumulation_steps=8, max_seq_len=340, data_file="pretrain_hq.jsonl",
                                 save_interval=100)
    engine.add_packing_flag(parser)
    args = parser.parse_args()
    data_path = engine.resolve_data_path(args, "pretrain_hq.jsonl", "pretrain.jsonl")
    runtime = engine.setup_runtime(args)
    tokenizer = engine.load_tokenizer(args.tokenizer_path)
    model = engine.load_model(args, runtime)
    dataset = PretrainDataset(str(data_path), tokenizer, max_length=args.max_seq_len)
    engine.Trainer(args, runtime, model).fit(engine.lm_batches(args, runtime, dataset), engine.causal_lm_loss)


if __name__ == "__main__":
    main()

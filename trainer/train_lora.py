"""LoRA fine-tuning: teach a chat model something new (who it is, a domain) through small adapters,
its own weights frozen.

    python trainer/train_lora.py                            # out/full_sft_512.pth + dataset/lora_medical.jsonl -> out/lora/lora_medical_512.pth
    python trainer/train_lora.py --lora_name lora_identity  # trains on dataset/lora_identity.jsonl
    python eval_llm.py --lora_weight lora_identity          # chat with the base model plus the adapter

Data and loss are SFT's: conversations with labels on the assistant replies (`SFTDataset`) and the
summed next-token cross-entropy (`engine.causal_lm_loss`). What differs is which weights learn:
`apply_lora` (model/model_lora.py) gives each target linear layer a low-rank update (alpha / r) B A
and freezes everything else, so only A and B reach the optimizer and only they are saved, with their
config beside them. The resume checkpoint holds the whole model, so resuming is exact as in every stage.
"""

import argparse

import torch

from dataset.lm_dataset import SFTDataset
from model.loader import lora_file
from model.model_lora import DEFAULT_TARGETS, LoRAConfig, apply_lora, lora_parameters, save_lora
from trainer import engine


def add_adapters(args: argparse.Namespace, model: torch.nn.Module, runtime: engine.Runtime) -> dict:
    config = LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                        targets=tuple(args.lora_targets.split(",")))
    layers = apply_lora(model, config)
    trainable = sum(p.numel() for p in lora_parameters(model))
    total = sum(p.numel() for p in model.parameters())
    runtime.print(f"LoRA rank {config.rank}, alpha {config.alpha:g} on {len(layers)} layers ({args.lora_targets}): "
                  f"{trainable:,} trainable parameters, {100 * trainable / total:.2f}% of the model")
    return {"params": lora_parameters(model), "weight_saver": save_lora,
            "weights_path": lora_file(args.save_weight, model.config, args.save_dir)}


def main() -> None:
    parser = engine.stage_parser(__doc__, save_weight="lora_medical", from_weight="full_sft", learning_rate=1e-4,
                                 epochs=10, batch_size=32, max_seq_len=340, data_file="<lora_name>.jsonl",
                                 log_interval=10, save_interval=100)
    engine.add_packing_flag(parser)
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora_name", dest="save_weight", default=argparse.SUPPRESS, metavar="NAME",
                      help="the original's name for --save_weight: the adapter is <save_dir>/lora/<lora_name>_<hidden>.pth")
    lora.add_argument("--lora_rank", type=int, default=8, help="r: the rank of each update B A")
    lora.add_argument("--lora_alpha", type=float, default=8.0, help="the update is scaled by alpha / r (alpha = r: the original's scale 1)")
    lora.add_argument("--lora_dropout", type=float, default=0.0, help="dropout on the adapters' input")
    lora.add_argument("--lora_targets", default=",".join(DEFAULT_TARGETS),
                      help="comma-separated names of the nn.Linear layers to adapt (a name matches itself and any '<prefix>.<name>')")
    args = parser.parse_args()
    engine.train_language_model(args, SFTDataset, f"{args.save_weight}.jsonl", "sft.jsonl",
                                prepare_model=lambda model, runtime: add_adapters(args, model, runtime))


if __name__ == "__main__":
    main()

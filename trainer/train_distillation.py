"""Knowledge distillation: a small student learns from a larger teacher's whole output distribution.

    python trainer/train_distillation.py        # student out/full_sft_512.pth, teacher out/full_sft_768.pth (MiniMind2)
    python trainer/train_distillation.py --teacher_preset minimind3 --from_teacher_weight full_sft

White-box distillation (Hinton et al., 2015): at every assistant token the student matches not only the
one right next token (cross-entropy, CE) but the teacher's probabilities over the whole vocabulary,
softened by a temperature T, which say which wrong tokens are nearly right:

    loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

T^2 keeps the KL term's gradient on the scale of the CE term's whatever T is. Both terms are summed over
the labelled (assistant) tokens and averaged per token by the engine. The teacher must share the
student's tokenizer (same vocabulary); it may be any size or layout (e.g. MoE teacher, dense student).
It is frozen, in eval mode, in the training dtype, and runs under `torch.inference_mode()`.
"""

import argparse
from functools import partial

import torch
import torch.nn.functional as F

from dataset.lm_dataset import SFTDataset
from model import loader
from model.model_minimind import next_token_nll
from trainer import engine


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, CE, KL), each summed over the labelled positions of (B, T, vocab) logits; `labels` are
    aligned with the input (-100 = not learned), so position t is scored on token t + 1."""
    ce = next_token_nll(student_logits, labels, reduction="sum")
    learned = labels[:, 1:] != -100
    student_logits, teacher_logits = student_logits[:, :-1][learned].float(), teacher_logits[:, :-1][learned].float()
    kl = F.kl_div(F.log_softmax(student_logits / temperature, dim=-1), F.log_softmax(teacher_logits / temperature, dim=-1),
                  log_target=True, reduction="sum") * temperature ** 2
    return alpha * ce + (1 - alpha) * kl, ce, kl


def distillation_step(model: torch.nn.Module, batch: dict, teacher: torch.nn.Module, temperature: float,
                      alpha: float) -> engine.LossOutput:
    inputs = {key: batch.get(key) for key in ("input_ids", "attention_mask", "position_ids")}
    out = model(**inputs)
    with torch.inference_mode():
        teacher_logits = teacher(**inputs).logits
    # .clone(): the teacher's logits leave inference mode as an ordinary tensor the loss's graph may keep
    loss_sum, ce, kl = distillation_loss(out.logits, teacher_logits.clone(), batch["labels"], temperature, alpha)
    count = int((batch["labels"][:, 1:] != -100).sum())  # only the assistant's tokens are learned
    return engine.LossOutput(loss_sum=loss_sum, count=count, aux_loss=out.aux_loss,
                             metrics={"ce": ce.item() / max(count, 1), "kl": kl.item() / max(count, 1)})


def add_original_aliases(parser: argparse.ArgumentParser) -> None:
    """The original script named the student's flags apart (`--student_hidden_size`, ...); they stay
    accepted as other names for the shared flags."""
    student = parser.add_argument_group("student (other names of the shared flags, as in the original)")
    for alias, dest, kind in (("--from_student_weight", "from_weight", str), ("--student_hidden_size", "hidden_size", int),
                              ("--student_num_layers", "num_hidden_layers", int), ("--student_use_moe", "use_moe", int),
                              ("--student_preset", "preset", str)):
        student.add_argument(alias, dest=dest, type=kind, default=argparse.SUPPRESS, help=f"= --{dest}")


def main() -> None:
    parser = engine.stage_parser(__doc__, save_weight="full_dist", from_weight="full_sft", learning_rate=5e-6, epochs=6,
                                 batch_size=32, max_seq_len=340, data_file="sft_mini_512.jsonl", save_interval=100)
    engine.add_packing_flag(parser)
    add_original_aliases(parser)
    teacher = parser.add_argument_group("teacher")
    teacher.add_argument("--from_teacher_weight", "--teacher_weight", dest="teacher_weight", default="full_sft",
                         help="a name in --save_dir (<name>_<teacher hidden>[_moe].pth), a .pth path or an HF directory")
    loader.add_size_args(teacher, "teacher_", hidden_size=768, num_hidden_layers=16)
    teacher.add_argument("--teacher_num_layers", dest="teacher_num_hidden_layers", type=int, default=argparse.SUPPRESS,
                         help="the original's name of --teacher_num_hidden_layers")
    kd = parser.add_argument_group("distillation")
    kd.add_argument("--alpha", type=float, default=0.5, help="weight of the CE term; the KL term gets 1 - alpha")
    kd.add_argument("--temperature", type=float, default=1.5, help="softens both distributions in the KL term")
    args = parser.parse_args()

    data_path = engine.resolve_data_path(args, "sft_mini_512.jsonl", "sft.jsonl")
    runtime = engine.setup_runtime(args)
    tokenizer = engine.load_tokenizer(args.tokenizer_path)
    student = engine.load_model(args, runtime)
    teacher_size = loader.size_from_args(args, "teacher_")
    teacher_model = engine.load_frozen_model(args, runtime, args.teacher_weight, "--teacher_weight", teacher_size)
    if teacher_model.config.vocab_size != student.config.vocab_size:
        raise SystemExit(f"error: the teacher's vocabulary ({teacher_model.config.vocab_size}) differs from the "
                         f"student's ({student.config.vocab_size}): distillation needs one tokenizer")
    dataset = engine.open_dataset(SFTDataset, data_path, tokenizer, args.max_seq_len, runtime)
    step = partial(distillation_step, teacher=teacher_model, temperature=args.temperature, alpha=args.alpha)
    engine.train_on(dataset, args, runtime, student, tokenizer, step)


if __name__ == "__main__":
    main()

"""DPO: learn from pairs of replies, one preferred ("chosen") and one not ("rejected"), without a reward model.

    python trainer/train_dpo.py                       # from out/full_sft_512.pth on dataset/dpo.jsonl (or the demo data)
    python trainer/train_dpo.py --learning_rate 1e-4 --rpo_alpha 1 --epochs 2   # the demo recipe (README figures);
                                                      # the original's lr 4e-8 barely moves a small model
    python trainer/train_dpo.py --precompute_ref 1    # reference log-probs scored once: no second model in memory

Direct Preference Optimization (Rafailov et al., 2023) trains the policy pi so that its implicit reward
r(y) = beta * log(pi(y|x) / pi_ref(y|x)) ranks the chosen reply y_w above the rejected y_l:

    loss = -log sigmoid(r(y_w) - r(y_l))

pi_ref is the frozen starting model (the SFT model, or `--ref_weight`); beta sets how far pi may drift
from it. log pi(y|x) is the SUM of the log-probabilities of the reply's tokens (the assistant tokens,
labelled by `DPODataset`); MiniMind averaged them instead, which is `--length_normalize 1`. `--loss_type`
swaps the sigmoid for IPO's squared loss or SLiC's hinge. Logged: the mean chosen/rejected reward, their
margin, and the preference accuracy (the share of pairs whose chosen reward is the higher).

DPO only asks that the chosen reply gain on the rejected one, and it can get there by lowering both:
the model may then find neither likely and answer something else. `--rpo_alpha a` adds a times the
chosen replies' negative log-likelihood per token (RPO, Pang et al., 2024; TRL's loss type "sft"
weighted by a), which keeps the chosen replies likely while the margin grows.
"""

import copy
import hashlib
import json
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dataset.lm_dataset import DPODataset, pad_preference_pairs
from model.cli import add_switch
from model.weights import atomic_save
from trainer import engine


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float, loss_type: str = "sigmoid",
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the implicit rewards of the chosen and rejected replies, from the policy's and
    the reference's log-probabilities of each reply (one value per pair)."""
    chosen_logratios = chosen_logps - ref_chosen_logps        # log pi(y_w|x) / pi_ref(y_w|x)
    rejected_logratios = rejected_logps - ref_rejected_logps  # log pi(y_l|x) / pi_ref(y_l|x)
    preference = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":  # DPO, eq. 7: the Bradley-Terry likelihood of the preference
        losses = -F.logsigmoid(beta * preference)
    elif loss_type == "hinge":  # SLiC (Zhao et al., 2023): stop pushing once the margin reaches 1
        losses = torch.relu(1 - beta * preference)
    elif loss_type == "ipo":  # IPO (Azar et al., 2023), eq. 17, on per-token log-ratios: regress the
        # preference to 1/(2 beta) instead of driving it to infinity, which overfits deterministic pairs
        per_token = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def reply_log_probs(model: torch.nn.Module, batch: dict, length_normalize: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """log pi(reply | prompt) for the chosen and the rejected side of each pair (summed over the
    reply's tokens, or their mean), their token counts, and the MoE balance loss. Both sides go
    through the model as one batch of 2B rows."""
    input_ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    out = model(input_ids=input_ids, attention_mask=torch.cat([batch["chosen_attention_mask"],
                                                               batch["rejected_attention_mask"]]))
    logps = engine.token_log_probs(out.logits, labels).sum(dim=1)
    tokens = (labels[:, 1:] != -100).sum(dim=1)
    if length_normalize:
        logps = logps / tokens.clamp(min=1)
    chosen_logps, rejected_logps = logps.chunk(2)
    chosen_tokens, rejected_tokens = tokens.chunk(2)
    return chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, out.aux_loss


def preference_step(model: torch.nn.Module, batch: dict, args, reference: torch.nn.Module | None) -> engine.LossOutput:
    """The loss of one micro-batch of pairs, summed over pairs (the engine divides by the pairs of the step)."""
    chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, aux_loss = reply_log_probs(
        model, batch, bool(args.length_normalize))
    if reference is None:
        ref_chosen_logps, ref_rejected_logps = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    else:
        with torch.inference_mode():
            ref_chosen_logps, ref_rejected_logps, *_ = reply_log_probs(reference, batch, bool(args.length_normalize))
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                                        args.beta, args.loss_type, chosen_tokens, rejected_tokens)
    # the chosen replies' NLL per token over the micro-batch (as TRL's "sft" loss term), given to every pair
    chosen_logp_sums = chosen_logps * chosen_tokens if args.length_normalize else chosen_logps
    chosen_nll = -chosen_logp_sums.sum() / chosen_tokens.sum().clamp(min=1)
    if args.rpo_alpha:
        losses = losses + args.rpo_alpha * chosen_nll
    metrics = {"chosen_nll": chosen_nll.item(), "reward_chosen": chosen_rewards.mean().item(),
               "reward_rejected": rejected_rewards.mean().item(),
               "reward_margin": (chosen_rewards - rejected_rewards).mean().item(),
               "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean().item()}
    return engine.LossOutput(loss_sum=losses.sum(), count=len(losses), aux_loss=aux_loss, metrics=metrics)


# ---------------------------------------------------------------------------------------------
# Precomputed reference log-probs (--precompute_ref 1)
# ---------------------------------------------------------------------------------------------

class PairsWithReference(torch.utils.data.Dataset):
    """DPO pairs, padded side by side, whose batches carry each pair's reference log-probs when
    they were precomputed."""

    packable = False

    def __init__(self, pairs: DPODataset, reference_logps: torch.Tensor | None = None):
        self.pairs, self.reference_logps = pairs, reference_logps
        self.pad_token_id, self.file = pairs.pad_token_id, pairs.file

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        item = self.pairs[i]
        if self.reference_logps is not None:
            item["ref_chosen_logps"], item["ref_rejected_logps"] = self.reference_logps[i]
        return item

    @staticmethod
    def collate(items: list[dict], max_length: int, pad_token_id: int) -> dict:
        batch = pad_preference_pairs(items, pad_token_id)
        if "ref_chosen_logps" in items[0]:
            for key in ("ref_chosen_logps", "ref_rejected_logps"):
                batch[key] = torch.stack([item[key] for item in items])
        return batch


def reference_fingerprint(args, data_path: Path, reference_name: str, runtime: engine.Runtime) -> str:
    """What the precomputed log-probs depend on: a stored table is reused only if all of it matches."""
    stat = data_path.stat()
    facts = [str(data_path), stat.st_size, stat.st_mtime_ns, reference_name, args.max_seq_len, args.length_normalize,
             args.tokenizer_path, str(runtime.dtype)]
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()


@torch.inference_mode()
def compute_reference_logps(reference: torch.nn.Module, pairs: DPODataset, args, runtime: engine.Runtime) -> torch.Tensor:
    """(pairs, 2): log pi_ref of each pair's chosen and rejected reply. Each process scores every
    world_size-th pair; a sum over processes assembles the table."""
    table = torch.zeros(len(pairs), 2, dtype=torch.float64)
    mine = list(range(runtime.rank, len(pairs), runtime.world_size))
    for start in tqdm(range(0, len(mine), args.batch_size), desc="reference log-probs", disable=not runtime.is_main):
        indices = mine[start:start + args.batch_size]
        batch = pad_preference_pairs([pairs[i] for i in indices], pairs.pad_token_id)
        batch = {key: value.to(runtime.device) for key, value in batch.items()}
        with runtime.autocast():
            chosen_logps, rejected_logps, *_ = reply_log_probs(reference, batch, bool(args.length_normalize))
        table[indices] = torch.stack([chosen_logps, rejected_logps], dim=1).double().cpu()
    return runtime.all_reduce(table).cpu().float()


def precomputed_reference(args, runtime: engine.Runtime, policy: torch.nn.Module, pairs: DPODataset,
                          data_path: Path, reference_name: str) -> torch.Tensor:
    """The reference log-probs of every pair, scored once before training and stored beside the resume
    checkpoint, so that a resumed run uses exactly the same numbers. When the reference is the starting
    weights, the policy scores them itself, before its first step: no second model is ever loaded."""
    stem = engine.weight_stem(policy.config, args.save_weight)
    path = engine.checkpoint_dir(args) / f"{stem}_reference_logps.pth"
    fingerprint = reference_fingerprint(args, data_path, reference_name, runtime)
    resuming = args.from_resume and (engine.checkpoint_dir(args) / f"{stem}_resume.pth").exists()
    if resuming and path.exists():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if stored["fingerprint"] == fingerprint:
            runtime.print(f"reference log-probs from {path}")
            return stored["logps"]
        runtime.print(f"{path} was scored for other data or flags: scoring again")
    if reference_name == args.from_weight:
        reference = policy.eval()
    else:
        reference = engine.load_frozen_model(args, runtime, reference_name, "--ref_weight")
    logps = compute_reference_logps(reference, pairs, args, runtime)
    policy.train()
    if runtime.is_main:
        atomic_save({"fingerprint": fingerprint, "logps": logps}, path)
    return logps


def main() -> None:
    parser = engine.stage_parser(__doc__, save_weight="dpo", from_weight="full_sft", learning_rate=4e-8, epochs=1,
                                 batch_size=4, max_seq_len=1024, data_file="dpo.jsonl", save_interval=100)
    dpo = parser.add_argument_group("DPO")
    dpo.add_argument("--beta", type=float, default=0.1, help="strength of the pull towards the reference model")
    dpo.add_argument("--loss_type", default="sigmoid", choices=["sigmoid", "ipo", "hinge"],
                     help="sigmoid = DPO; ipo = IPO's squared loss (per-token log-ratios); hinge = SLiC")
    add_switch(dpo, "--length_normalize",
                      help="1 = mean instead of sum of the reply's token log-probs (the original MiniMind's choice)")
    dpo.add_argument("--rpo_alpha", type=float, default=0.0,
                     help="weight of the chosen reply's per-token NLL added to the loss (RPO; 0 = plain DPO)")
    dpo.add_argument("--ref_weight", default=None,
                     help="reference model: a name in --save_dir, a .pth path or an HF directory (default: --from_weight)")
    add_switch(dpo, "--precompute_ref",
                      help="1 = score every pair with the reference once, before training, instead of keeping the "
                           "reference model in memory")
    args = parser.parse_args()
    if args.loss_type == "ipo" and args.length_normalize:
        parser.error("--loss_type ipo already compares per-token log-ratios; leave --length_normalize 0")

    data_path = engine.resolve_data_path(args, "dpo.jsonl", "dpo.jsonl")
    runtime = engine.setup_runtime(args)
    tokenizer = engine.load_tokenizer(args.tokenizer_path)
    policy = engine.load_model(args, runtime)
    pairs = engine.open_dataset(DPODataset, data_path, tokenizer, args.max_seq_len, runtime)
    reference_name = args.ref_weight or args.from_weight
    if args.precompute_ref:
        dataset = PairsWithReference(pairs, precomputed_reference(args, runtime, policy, pairs, data_path, reference_name))
        reference = None
    elif reference_name == args.from_weight:  # the starting weights: a frozen copy, not a second read
        dataset, reference = PairsWithReference(pairs), engine.freeze(copy.deepcopy(policy), runtime)
    else:
        dataset = PairsWithReference(pairs)
        reference = engine.load_frozen_model(args, runtime, reference_name, "--ref_weight")
    step = partial(preference_step, args=args, reference=reference)
    engine.train_on(dataset, args, runtime, policy, tokenizer, step)


if __name__ == "__main__":
    main()

"""GRPO: Group Relative Policy Optimization (DeepSeekMath), with token-level normalisation and clip-higher
(DAPO), or the CISPO loss (MiniMax-M1).

    python trainer/train_grpo.py          # from out/full_sft_512.pth on dataset/rlaif-mini.jsonl (or the demo prompts)
    python trainer/train_grpo.py --loss_type cispo

No critic. Each prompt is answered `--num_generations` times, and every token of response i gets the
advantage of its reward against the rest of its group:

    A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)

The loss of response token t, with ratio_t = pi(y_t) / pi_old(y_t) (pi_old: the policy that sampled):

    grpo:   -min(ratio_t * A_i, clip(ratio_t, 1 - eps, 1 + eps_high) * A_i)  +  beta * KL_k3(pi || ref)_t
    cispo:  -sg(min(ratio_t, 1 + eps_high)) * A_i * log pi(y_t)               +  beta * KL_k3(pi || ref)_t

summed over every response token of the optimizer step (all micro-batches and processes) and divided
by their number: token-level normalisation, so a long response counts by its tokens rather than as one
sample (DAPO; TRL's loss_type "dapo"). CISPO clips the importance weight instead of the update and
stops its gradient (sg), so every token keeps a gradient, including the rare ones a clip would drop.
With `--ppo_epochs 1` (the default) pi_old = pi and the ratio is 1; the clip matters from 2 on.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from trainer import engine, rl


def surrogate(args: argparse.Namespace):
    """The per-token policy loss of `--loss_type`, as `surrogate(log_probs, old_log_probs, advantages)`."""
    if args.loss_type == "cispo":
        return partial(cispo_surrogate, epsilon_high=args.epsilon_high)
    return partial(rl.clipped_surrogate, epsilon_low=args.epsilon, epsilon_high=args.epsilon_high)


def cispo_surrogate(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                    epsilon_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """CISPO's per-token loss -sg(min(ratio, 1 + eps_high)) * A * log pi, and where the weight was capped."""
    ratio = torch.exp(log_probs - old_log_probs)
    weight = ratio.clamp(max=1 + epsilon_high).detach()
    return -weight * advantages * log_probs, ratio > 1 + epsilon_high


def group_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Each reward against its group's: (r - mean) / (std + 1e-4). A group whose responses all scored
    the same teaches nothing (advantage 0): the model was uniformly right or wrong there."""
    groups = rewards.view(-1, num_generations)
    advantages = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)
    return advantages.flatten()


class GRPO(rl.Algorithm):
    """Groups of `--num_generations` responses per prompt, each scored against its group."""

    def __init__(self, args: argparse.Namespace, setup: rl.Setup):
        self.args, self.setup = args, setup
        self.num_generations = args.num_generations
        self.surrogate = surrogate(args)

    @torch.no_grad()
    def add_advantages(self, experience: list[dict]) -> None:
        """Group-relative advantages and (if several updates follow) the sampling policy's log-probs."""
        args, setup = self.args, self.setup
        for batch in experience:
            batch["advantages"] = group_advantages(batch["rewards"], self.num_generations).to(setup.runtime.device)
            batch["old_log_probs"] = rl.frozen_log_probs(setup.policy, batch, args, setup.runtime) \
                if args.ppo_epochs > 1 else None
            uniform = batch["rewards"].view(-1, self.num_generations).std(1) == 0
            batch["rollout_metrics"]["uniform_groups"] = float(uniform.float().mean())

    def loss(self, model: torch.nn.Module, batch: dict) -> engine.LossOutput:
        return rl.critic_free_loss(model, batch, self.args, self.surrogate)


def main() -> None:
    parser = rl.stage_parser(__doc__, save_weight="grpo", batch_size=2, ppo_epochs=1)
    grpo = parser.add_argument_group("GRPO")
    grpo.add_argument("--num_generations", type=int, default=8, help="responses sampled per prompt (the group)")
    grpo.add_argument("--loss_type", default="grpo", choices=["grpo", "cispo"],
                      help="cispo caps the importance weight at 1 + --epsilon_high "
                           "(default there: 4, a cap of 5 as ScaleRL)")
    grpo.add_argument("--beta", type=float, default=0.04, help="weight of the k3 KL to the reference in the loss")
    args = parser.parse_args()
    if args.num_generations < 2:
        parser.error("--num_generations must be at least 2: a group of one has no baseline")
    if args.loss_type == "cispo" and args.epsilon_high is None:
        args.epsilon_high = 4.0

    setup = rl.setup(args)
    trainer = engine.Trainer(args, setup.runtime, setup.policy, tokenizer=setup.tokenizer)
    rl.train(args, setup, trainer, GRPO(args, setup))


if __name__ == "__main__":
    main()

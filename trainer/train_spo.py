"""SPO: Single-stream Policy Optimization (Xu & Ding, 2025): one response per prompt, and a persistent,
KL-adaptive value tracker as the baseline.

    python trainer/train_spo.py           # from out/full_sft_512.pth on dataset/rlaif-mini.jsonl (or the demo prompts)

GRPO needs a group of responses per prompt for its baseline, and a group that is all right or all wrong
teaches nothing. SPO samples each prompt once and keeps, per prompt x, a Beta(alpha, beta) belief about
the success probability p(x) of the policy on it: the baseline is its mean

    v(x) = alpha / (alpha + beta)

(on the [0, 1] scale; rewards are mapped onto it with the lowest and highest total the reward functions
can give). After a reward r it updates with a forgetting factor rho that shrinks as the policy moves:

    alpha <- rho * alpha + r,   beta <- rho * beta + (1 - r),   rho = clip(2^(-D / D_half), rho_min, rho_max)

with D the policy's drift (KL between the policies, summed over the updates) since x was last seen: old
evidence about a policy that no longer exists weighs less. A prompt seen for the first time starts from
the running success rate over all prompts, worth 1 / (1 - rho_min) observations. Advantages
A = r - v(x) are then whitened over the batch, and every response token t takes GRPO's loss, with
ratio_t = pi(y_t) / pi_old(y_t):

    -min(ratio_t * A, clip(ratio_t, 1 - eps, 1 + eps_high) * A)  +  kl_weight * KL_k3(pi || ref)_t

summed over the step's response tokens and divided by their number (`rl.critic_free_loss`; kl_weight is
`--beta`, 0 by default). Every process applies every process's updates, so the trackers stay identical
under torchrun, and they are saved in the resume checkpoint.
SPO's prioritised prompt sampling is not used: prompts come in the data order of the other stages.
"""

from __future__ import annotations

import argparse
import hashlib
from functools import partial

import torch
import torch.distributed as dist

from trainer import engine, rl


class ValueTracker:
    """Per-prompt Beta(alpha, beta) beliefs of success, forgetting at the pace the policy drifts.

    State: for each prompt (by a hash of its text) alpha, beta and the cumulative drift when it was last
    updated; the same for the running all-prompt belief that new prompts start from; the cumulative
    drift of the policy so far."""

    def __init__(self, rho_min: float, rho_max: float, drift_half_life: float):
        self.rho_min, self.rho_max, self.drift_half_life = rho_min, rho_max, drift_half_life
        self.prior_weight = 1.0 / (1.0 - rho_min)  # the effective memory of the slowest forgetting allowed
        self.prompts: dict[str, list[float]] = {}
        self.overall = [0.5 * self.prior_weight, 0.5 * self.prior_weight, 0.0]
        self.drift = 0.0

    @staticmethod
    def key(prompt: str) -> str:
        return hashlib.blake2b(prompt.encode(), digest_size=8).hexdigest()

    def rho(self, drift_at_last_update: float) -> float:
        drift = self.drift - drift_at_last_update
        return min(max(2.0 ** (-drift / self.drift_half_life), self.rho_min), self.rho_max)

    def belief(self, prompt: str) -> list[float]:
        if (key := self.key(prompt)) not in self.prompts:
            alpha, beta, _ = self.overall
            success = alpha / (alpha + beta)
            self.prompts[key] = [self.prior_weight * success, self.prior_weight * (1 - success), self.drift]
        return self.prompts[key]

    def baseline(self, prompt: str) -> float:
        alpha, beta, _ = self.belief(prompt)
        return alpha / (alpha + beta)

    def update(self, prompts: list[str], successes: list[float]) -> None:
        for prompt, success in zip(prompts, successes):
            self._observe(self.belief(prompt), success)
        if successes:
            self._observe(self.overall, sum(successes) / len(successes))

    def _observe(self, belief: list[float], success: float) -> None:
        rho = self.rho(belief[2])
        belief[:] = [rho * belief[0] + success, rho * belief[1] + (1 - success), self.drift]

    def state_dict(self) -> dict:
        return {"prompts": {key: list(value) for key, value in self.prompts.items()},
                "overall": list(self.overall), "drift": self.drift}

    def load_state_dict(self, state: dict) -> None:
        self.prompts = {key: list(value) for key, value in state["prompts"].items()}
        self.overall, self.drift = list(state["overall"]), float(state["drift"])


def all_processes(values: list) -> list:
    """Every process's list, concatenated in rank order (just `values` without torchrun)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, values)
    return [value for part in gathered for value in part]


class SPO(rl.Algorithm):
    """One response per prompt; the advantage is its reward against the tracker's baseline."""

    def __init__(self, args: argparse.Namespace, setup: rl.Setup, tracker: ValueTracker):
        self.args, self.setup, self.tracker = args, setup, tracker
        self.surrogate = partial(rl.clipped_surrogate, epsilon_low=args.epsilon, epsilon_high=args.epsilon_high)

    @torch.no_grad()
    def add_advantages(self, experience: list[dict]) -> None:
        """Advantage = reward - the tracker's baseline, whitened over the batch; then every process's
        rewards update the tracker."""
        args, setup, tracker = self.args, self.setup, self.tracker
        low, high = setup.rewards.bounds
        observed = []
        for batch in experience:
            rewards, prompts = batch["rewards"], batch["prompts"]
            baselines = torch.tensor([low + (high - low) * tracker.baseline(p) for p in prompts])
            advantages = rewards - baselines
            advantages = (advantages - advantages.mean()) / (advantages.std(correction=0) + 1e-4)
            observed += [(prompt, (reward - low) / (high - low)) for prompt, reward in zip(prompts, rewards.tolist())]
            batch["advantages"] = advantages.to(setup.runtime.device)
            batch["old_log_probs"] = rl.frozen_log_probs(setup.policy, batch, args, setup.runtime)
            batch["rollout_metrics"].update(baseline=float(baselines.mean()), tracked_prompts=len(tracker.prompts))
        everyone = all_processes(observed)
        tracker.update([prompt for prompt, _ in everyone], [success for _, success in everyone])

    def loss(self, model: torch.nn.Module, batch: dict) -> engine.LossOutput:
        return rl.critic_free_loss(model, batch, self.args, self.surrogate)

    @torch.no_grad()
    def after_updates(self, experience: list[dict]) -> None:
        """How far the window's updates moved the policy: the mean k3 KL(old || new) over the window's
        response tokens (averaged over processes), added to the tracker's cumulative drift."""
        kl_sum, tokens = 0.0, 0.0
        for batch in experience:
            new_log_probs = rl.frozen_log_probs(self.setup.policy, batch, self.args, self.setup.runtime)
            kl_sum += float((rl.k3_kl(batch["old_log_probs"], new_log_probs) * batch["response_mask"]).sum())
            tokens += float(batch["response_mask"].sum())
        kl_sum, tokens = self.setup.runtime.all_reduce([kl_sum, tokens]).tolist()
        self.tracker.drift += kl_sum / max(tokens, 1.0)


def main() -> None:
    parser = rl.stage_parser(__doc__, save_weight="spo", batch_size=8, ppo_epochs=1)
    spo = parser.add_argument_group("SPO")
    spo.add_argument("--beta", type=float, default=0.0, help="weight of the k3 KL to the reference in the loss")
    spo.add_argument("--rho_min", type=float, default=0.875, help="fastest forgetting of the value tracker")
    spo.add_argument("--rho_max", type=float, default=0.96, help="slowest forgetting of the value tracker")
    spo.add_argument("--drift_half_life", type=float, default=0.06,
                     help="policy drift (KL) that halves the weight of a prompt's past rewards")
    args = parser.parse_args()
    if not 0 < args.rho_min <= args.rho_max < 1:
        parser.error("need 0 < --rho_min <= --rho_max < 1")

    setup = rl.setup(args)
    tracker = ValueTracker(args.rho_min, args.rho_max, args.drift_half_life)
    trainer = engine.Trainer(args, setup.runtime, setup.policy, tokenizer=setup.tokenizer,
                             state_objects={"tracker": tracker})
    rl.train(args, setup, trainer, SPO(args, setup, tracker))

if __name__ == "__main__":
    main()

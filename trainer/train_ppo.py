"""PPO for language models (InstructGPT-style RLHF): an actor, a critic, GAE and clipped updates.

    python trainer/train_ppo.py           # from out/full_sft_512.pth on dataset/rlaif-mini.jsonl (or the demo prompts)

The response is a sequence of actions, one per token. Its reward arrives per token:

    r_t = -kl_coef * (log pi_old(y_t) - log ref(y_t))          every token: stay near the reference
        + score(response)                                      the last token: the reward functions

The critic V (a MiniMind trunk with a linear value head) predicts the return from each prefix, and
generalised advantage estimation (GAE) turns rewards and values into advantages:

    delta_t = r_t + gamma * V_{t+1} - V_t          (V after the last token = 0)
    A_t     = delta_t + gamma * lam * A_{t+1}      returns R_t = A_t + V_t

Advantages are whitened over the batch's tokens. Then `--ppo_epochs` optimizer steps on the same
rollouts minimise, per response token (summed and divided by the step's token count),

    -min(ratio_t * A_t, clip(ratio_t, 1 - eps, 1 + eps_high) * A_t)                      the actor
    + vf_coef * 0.5 * max((V_t - R_t)^2, (V_old_t + clip(V_t - V_old_t, ±value_eps) - R_t)^2)   the critic

Writes `ppo_actor_<hidden>.pth` (the policy, a normal MiniMind weight file) and `ppo_critic_<hidden>.pth`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.utils import ModelOutput

from model.model_minimind import MiniMindForCausalLM, MiniMindModel
from model.weights import save_weights
from trainer import engine, rl


def ppo_loss(model: torch.nn.Module, batch: dict, args: argparse.Namespace) -> engine.LossOutput:
    out = rl.forward(model, batch)
    log_probs = rl.response_log_probs(out.logits, batch, args.temperature)
    mask = batch["response_mask"]
    policy_loss, clipped = rl.clipped_surrogate(log_probs, batch["old_log_probs"], batch["advantages"],
                                                args.epsilon, args.epsilon_high)
    values, old_values, returns = out.state_values[:, :-1].float(), batch["old_values"], batch["returns"]
    clipped_values = old_values + (values - old_values).clamp(-args.value_epsilon, args.value_epsilon)
    value_loss = 0.5 * torch.max((values - returns) ** 2, (clipped_values - returns) ** 2)
    per_token = policy_loss + args.vf_coef * value_loss
    entropy = rl.response_entropy(out.logits, batch, args.temperature)
    metrics = {**rl.update_metrics(batch, mask, clipped, log_probs, entropy),
               "policy_loss": float(rl.masked_mean(policy_loss.detach(), mask)),
               "value_loss": float(rl.masked_mean(value_loss.detach(), mask))}
    return engine.LossOutput(loss_sum=(per_token * mask).sum(), count=int(mask.sum()), aux_loss=out.aux_loss,
                             metrics=metrics)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens of each row, (N, R) each.

    The reverse loop carries A_{t+1} back one token at a time; masked positions (past the end of a
    response) contribute neither a value nor an advantage. Returns (advantages, returns)."""
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value = values[:, t] * mask[:, t]
        next_advantage = advantages[:, t]
    return advantages, (advantages + values) * mask


def kl_shaped_rewards(scores: torch.Tensor, old_log_probs: torch.Tensor, ref_log_probs: torch.Tensor,
                      mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r_t of the docstring, (N, R): -kl_coef * (log pi_old - log ref) at every response token, plus
    the response's score at its last token."""
    token_rewards = -kl_coef * (old_log_probs - ref_log_probs) * mask
    last_token = mask.sum(-1).long() - 1
    rows = torch.arange(len(last_token), device=mask.device)
    token_rewards[rows, last_token] += scores.to(mask.device)
    return token_rewards


class PPO(rl.Algorithm):
    """One response per prompt; the critic's values and GAE turn the shaped rewards into advantages."""

    def __init__(self, args: argparse.Namespace, setup: rl.Setup, actor_critic: "ActorCritic"):
        self.args, self.setup, self.actor_critic = args, setup, actor_critic

    @torch.no_grad()
    def add_advantages(self, experience: list[dict]) -> None:
        """Fix what the PPO epochs compare against: the sampling policy's log-probs and values, the
        KL-shaped per-token rewards, advantages and returns."""
        args, setup = self.args, self.setup
        for batch in experience:
            mask = batch["response_mask"]
            with setup.runtime.autocast():
                old = rl.forward(self.actor_critic, batch)
            batch["old_log_probs"] = rl.response_log_probs(old.logits, batch, args.temperature)
            batch["old_values"] = old.state_values[:, :-1].float() * mask
            token_rewards = kl_shaped_rewards(batch["rewards"], batch["old_log_probs"], batch["ref_log_probs"], mask,
                                              args.kl_coef)
            advantages, batch["returns"] = gae(token_rewards, batch["old_values"], mask, args.gamma, args.lam)
            batch["advantages"] = rl.masked_whiten(advantages, mask)
            batch["rollout_metrics"]["value"] = float(rl.masked_mean(batch["old_values"], mask))

    def loss(self, model: torch.nn.Module, batch: dict) -> engine.LossOutput:
        return ppo_loss(model, batch, self.args)


# ---------------------------------------------------------------------------------------------
# The critic, and the actor-critic pair that trains as one module
# ---------------------------------------------------------------------------------------------

class Critic(nn.Module):
    """V(prefix): a MiniMind trunk, started from the policy's, and a linear head on each position's
    final hidden state. The head starts at zero, so the first values are 0 rather than noise."""

    def __init__(self, policy: MiniMindForCausalLM):
        super().__init__()
        self.config = policy.config
        self.model = MiniMindModel(policy.config)
        self.model.load_state_dict(policy.model.state_dict(), strict=True)
        self.value_head = nn.Linear(policy.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                values_to_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        trunk = self.model(input_ids, attention_mask, position_ids)
        return self.value_head(trunk.last_hidden_state[:, -values_to_keep:]).squeeze(-1), trunk.aux_loss


@dataclass
class ActorCriticOutput(ModelOutput):
    """A ModelOutput is a dict: a field named `values` would hide `dict.values()`, which DeepSpeed walks."""
    logits: torch.Tensor | None = None
    state_values: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


class ActorCritic(nn.Module):
    """Actor and critic as one module: one optimizer, one LR schedule, one DDP wrapper (whose forward
    must run for its gradient all-reduce) and one resume state serve both."""

    def __init__(self, actor: MiniMindForCausalLM):
        super().__init__()
        self.actor, self.critic = actor, Critic(actor)
        self.config = actor.config  # names the files (ppo_actor_<hidden>.pth)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                logits_to_keep: int) -> ActorCriticOutput:
        actor = self.actor(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           logits_to_keep=logits_to_keep)
        values, critic_aux_loss = self.critic(input_ids, attention_mask, position_ids, logits_to_keep)
        return ActorCriticOutput(logits=actor.logits, state_values=values, aux_loss=actor.aux_loss + critic_aux_loss)


def actor_and_critic_saver(args: argparse.Namespace):
    """Weight files: the actor as a normal MiniMind file (`ppo_actor_<hidden>.pth`, the path the engine
    passes), the critic beside it under the same name with "critic" for "actor"."""
    name = args.save_weight
    critic_name = name.replace("actor", "critic") if "actor" in name else f"{name}_critic"

    def save(model: ActorCritic, path: Path, extra: dict) -> None:
        save_weights(model.actor, path, extra)
        save_weights(model.critic, path.with_name(f"{engine.weight_stem(model.config, critic_name)}.pth"), extra)
    return save


def main() -> None:
    parser = rl.stage_parser(__doc__, save_weight="ppo_actor", batch_size=4, ppo_epochs=2)
    ppo = parser.add_argument_group("PPO")
    ppo.add_argument("--value_epsilon", type=float, default=0.2, help="value clip: V_old ± this")
    ppo.add_argument("--vf_coef", type=float, default=0.5, help="weight of the critic's loss")
    ppo.add_argument("--kl_coef", type=float, default=0.02, help="per-token KL penalty to the reference in the reward")
    ppo.add_argument("--gamma", type=float, default=1.0, help="discount per token")
    ppo.add_argument("--lam", type=float, default=0.95, help="GAE's lambda: 0 = one-step TD, 1 = Monte Carlo")
    args = parser.parse_args()

    setup = rl.setup(args)
    actor_critic = ActorCritic(setup.policy).to(setup.runtime.device)
    trainer = engine.Trainer(args, setup.runtime, actor_critic, tokenizer=setup.tokenizer,
                             weight_saver=actor_and_critic_saver(args), eval_model=setup.policy)
    rl.train(args, setup, trainer, PPO(args, setup, actor_critic))


if __name__ == "__main__":
    main()

"""The PPO loss, PPO's KL-shaped rewards and SPO's value tracker, each against a hand-written reference
written out from the formulas in the stage's docstring (GAE, GRPO and CISPO are in test_rl.py)."""

import io
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import left_padded_rollout
from model.model_minimind import PRESETS, MiniMindConfig, MiniMindForCausalLM
from trainer import rl
from trainer.train_ppo import ActorCritic, kl_shaped_rewards, ppo_loss
from trainer.train_spo import ValueTracker

EOS = 2


def test_ppo_loss_matches_the_docstring_formulas():
    """`ppo_loss` on a left-padded batch equals, in value and in gradient, the docstring's per-token
    clipped surrogate plus vf_coef * 0.5 * max(unclipped, clipped value error), computed here row by row
    on each unpadded sequence and averaged over the response tokens.

    Fails if e.g. eps and eps_high are swapped, the value loss takes the min (or drops the 0.5), the
    value clip uses eps, the values or log-probs are read one position off, the temperature is ignored, or the
    mask is not applied."""
    torch.manual_seed(0)
    actor_critic = ActorCritic(MiniMindForCausalLM(MiniMindConfig(**PRESETS["tiny"]))).eval()
    torch.nn.init.normal_(actor_critic.critic.value_head.weight, std=0.1)  # the zero init would make V trivial
    torch.nn.init.constant_(actor_critic.critic.value_head.bias, 0.3)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]
    responses = [[20, 21, 22, EOS], [23, 24, 25, 26, 27, 28], [EOS]]  # the second was cut off
    batch = rl.rollout_batch(left_padded_rollout(prompts, responses))
    rows, response_length = batch["response_mask"].shape
    args = SimpleNamespace(temperature=0.8, epsilon=0.1, epsilon_high=0.2, value_epsilon=0.15, vf_coef=0.5)

    def reference_per_row():
        """log pi(y_t) at temperature T and V_t = V(prompt + y_<t) for each row alone, no padding."""
        for prompt, response in zip(prompts, responses):
            alone = torch.tensor([prompt + response])
            logits = actor_critic.actor(alone).logits[0, len(prompt) - 1:-1].float() / args.temperature
            log_probs = logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
            hidden = actor_critic.critic.model(alone).last_hidden_state[0, len(prompt) - 1:-1]
            yield log_probs, actor_critic.critic.value_head(hidden).squeeze(-1).float()

    # Old log-probs and values placed so that every case of both clips occurs: ratios below 1 - eps,
    # inside, between 1 + eps and 1 + eps_high (where eps_high decides), and above; advantages of both
    # signs; V - V_old inside and outside ±value_eps. Entries past a response are finite noise.
    ratios = [0.6, 0.95, 1.15, 1.3, 0.85, 1.05, 1.5]
    token_advantages = [1.0, -0.7, 1.2, 0.8, -1.1]
    value_shifts = [0.3, -0.05, -0.25, 0.02, 0.12]
    with torch.no_grad():
        current = list(reference_per_row())
    old_log_probs, old_values = torch.randn(rows, response_length), torch.randn(rows, response_length)
    advantages = torch.randn(rows, response_length)
    token = 0
    for row, (log_probs, values) in enumerate(current):
        for t in range(len(log_probs)):
            old_log_probs[row, t] = log_probs[t] - math.log(ratios[token % len(ratios)])
            old_values[row, t] = values[t] - value_shifts[token % len(value_shifts)]
            advantages[row, t] = token_advantages[token % len(token_advantages)]
            token += 1
    batch.update(old_log_probs=old_log_probs, advantages=advantages, old_values=old_values,
                 returns=old_values + torch.randn(rows, response_length),
                 ref_log_probs=old_log_probs + 0.1 * torch.randn(rows, response_length), rollout_metrics={})

    out = ppo_loss(actor_critic, batch, args)
    ours = out.loss_sum / out.count
    params = [p for p in actor_critic.parameters() if p.requires_grad]
    ours_grad = torch.autograd.grad(ours, params)

    total, tokens, policy_clipped, value_clipped = 0.0, 0, 0, 0
    for row, (log_probs, values) in enumerate(reference_per_row()):
        for t in range(len(log_probs)):
            ratio = torch.exp(log_probs[t] - old_log_probs[row, t])
            a = advantages[row, t]
            policy = -torch.min(ratio * a, ratio.clamp(1 - args.epsilon, 1 + args.epsilon_high) * a)
            v, v_old, ret = values[t], old_values[row, t], batch["returns"][row, t]
            v_clipped = v_old + (v - v_old).clamp(-args.value_epsilon, args.value_epsilon)
            value = 0.5 * torch.max((v - ret) ** 2, (v_clipped - ret) ** 2)
            total = total + policy + args.vf_coef * value
            tokens += 1
            policy_clipped += bool((policy + ratio * a).abs() > 1e-6)
            value_clipped += bool((v_clipped - ret) ** 2 > (v - ret) ** 2 + 1e-6)
    reference = total / tokens
    reference_grad = torch.autograd.grad(reference, params)

    assert out.count == tokens == 11
    assert policy_clipped >= 3 and value_clipped >= 2  # both clips change the loss here
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-6)
    for name, (mine, theirs) in zip([n for n, p in actor_critic.named_parameters() if p.requires_grad],
                                    zip(ours_grad, reference_grad)):
        assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-6), name
    assert out.metrics["clip_frac"] > 0


def test_kl_shaped_rewards_match_a_per_row_loop():
    """-kl_coef * (log pi_old - log ref) on every response token, the score added on each row's last
    response token, 0 past the response. Fails if the score lands one token late or on the last column
    of every row, if the KL term has the wrong sign, or if padding positions keep their KL term."""
    torch.manual_seed(0)
    lengths, width, kl_coef = [3, 5, 1, 4], 5, 0.07
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).float()
    old_log_probs, ref_log_probs = torch.randn(4, width), torch.randn(4, width)  # noise past the responses too
    scores = torch.tensor([1.5, -0.5, 2.0, 0.25])
    rewards = kl_shaped_rewards(scores, old_log_probs, ref_log_probs, mask, kl_coef)
    for row, length in enumerate(lengths):
        expected = [0.0] * width
        for t in range(length):
            expected[t] = -kl_coef * (old_log_probs[row, t].item() - ref_log_probs[row, t].item())
        expected[length - 1] += scores[row].item()
        assert rewards[row].tolist() == pytest.approx(expected, abs=1e-6), row


class BetaTrackerByHand:
    """SPO's value tracker as its docstring states it, on plain floats and prompt strings.

    A prompt seen for the first time (asked for its baseline or updated) starts at the running overall
    success rate, worth 1 / (1 - rho_min) observations. Each observation r of a belief (alpha, beta, last
    drift) forgets by rho = clip(2^(-D / D_half), rho_min, rho_max), D the drift since that belief was last
    updated: alpha <- rho * alpha + r, beta <- rho * beta + (1 - r). The overall belief observes the batch
    mean after the batch's prompts. Before any data it is 1/2, with the same weight (the docstring
    leaves this open; it is the tracker's choice)."""

    def __init__(self, rho_min: float, rho_max: float, half_life: float):
        self.rho_min, self.rho_max, self.half_life = rho_min, rho_max, half_life
        self.weight = 1 / (1 - rho_min)
        self.overall = {"alpha": self.weight / 2, "beta": self.weight / 2, "seen_at": 0.0}
        self.prompts: dict[str, dict] = {}
        self.drift = 0.0

    def _first_seen(self, prompt: str) -> dict:
        if prompt not in self.prompts:
            rate = self.overall["alpha"] / (self.overall["alpha"] + self.overall["beta"])
            self.prompts[prompt] = {"alpha": self.weight * rate, "beta": self.weight * (1 - rate), "seen_at": self.drift}
        return self.prompts[prompt]

    def baseline(self, prompt: str) -> float:
        belief = self._first_seen(prompt)
        return belief["alpha"] / (belief["alpha"] + belief["beta"])

    def _observe(self, belief: dict, r: float) -> None:
        rho = min(max(2 ** (-(self.drift - belief["seen_at"]) / self.half_life), self.rho_min), self.rho_max)
        belief["alpha"] = rho * belief["alpha"] + r
        belief["beta"] = rho * belief["beta"] + (1 - r)
        belief["seen_at"] = self.drift

    def update(self, prompts: list[str], rewards: list[float]) -> None:
        for prompt, r in zip(prompts, rewards):
            self._observe(self._first_seen(prompt), r)
        self._observe(self.overall, sum(rewards) / len(rewards))


def test_value_tracker_follows_its_update_rules_and_resumes_exactly():
    """Several batches with drift in between (rho inside the clip, at rho_min, at rho_max), new prompts
    starting from the overall rate: every baseline equals the hand simulation's; a tracker restored
    from a saved state_dict continues exactly as the original. Fails if new prompts start at 1/2 rather
    than the overall rate, if rho is not clipped or uses the total drift, if the overall belief observes
    the sum or is not updated, or if state_dict / load_state_dict lose part of the state."""
    rho_min, rho_max, half_life = 0.6, 0.95, 0.1
    tracker, by_hand = ValueTracker(rho_min, rho_max, half_life), BetaTrackerByHand(rho_min, rho_max, half_life)

    def check(*trackers: ValueTracker) -> None:
        for prompt in by_hand.prompts:
            for t in trackers:
                assert t.baseline(prompt) == pytest.approx(by_hand.baseline(prompt), rel=1e-12), prompt

    def step(trackers: list[ValueTracker], drift: float, prompts: list[str], rewards: list[float]) -> None:
        by_hand.drift += drift
        for t in trackers:
            t.drift += drift
        for prompt in prompts:  # SPO asks for the baselines before it updates
            for t in trackers:
                assert t.baseline(prompt) == pytest.approx(by_hand.baseline(prompt), rel=1e-12), prompt
        by_hand.update(prompts, rewards)
        for t in trackers:
            t.update(prompts, rewards)
        check(*trackers)

    step([tracker], 0.0, ["a", "b"], [1.0, 0.5])
    # By hand: weight 2.5, a starts at (1.25, 1.25), rho = rho_max: (0.95 * 1.25 + 1, 0.95 * 1.25) -> 2.1875 / 3.375.
    assert tracker.baseline("a") == pytest.approx(2.1875 / 3.375)
    step([tracker], 0.05, ["a", "c"], [0.5, 1.0])  # "c" starts at the overall rate (0.574...); a: rho = 2^-0.5
    assert tracker.baseline("c") != pytest.approx(0.5, abs=1e-3)

    restored = ValueTracker(rho_min, rho_max, half_life)
    buffer = io.BytesIO()
    torch.save(tracker.state_dict(), buffer)  # as the resume checkpoint stores it
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer, weights_only=False))
    both = [tracker, restored]
    step(both, 0.3, ["b", "a", "d"], [1.0, 0.0, 0.25])  # rho clipped at rho_min for "a" and "b"
    step(both, 0.02, ["c", "c"], [0.0, 1.0])  # the same prompt twice in one batch
    step(both, 0.0, ["d"], [0.75])
    assert tracker.state_dict() == restored.state_dict()

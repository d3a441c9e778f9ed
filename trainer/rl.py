"""Rollouts, rewards and log-probabilities: what PPO, GRPO and SPO share.

Each RL stage repeats one step:

    prompts --sample--> responses --reward--> one score per response
            --advantage (the stage's own: GAE, group-relative, value tracker)--> clipped policy updates

The stage files hold their advantage and their loss. This module holds the rest, once:

* `sample`: batched sampling from the policy with our decode loop (`model/generate.py`). Prompts come
  left-padded, so every row continues at the same column; the attention mask hides the padding and
  positions count real tokens only. `Rollout.response_mask` covers each response up to and including
  its end-of-turn token.
* `response_log_probs`: log pi(token | prefix) and the entropy at every response position, from the
  logits of any model: the policy being trained, the policy that sampled ("old"), the frozen reference.
  One function, so ratios and KL terms always compare like with like (same temperature, same mask).
* rewards behind one interface, `RewardComponent`: rule-based (`AnswerReward`, `FormatReward`,
  `LengthPenalty`) and model-based (`ModelReward`: any HF sequence-classification directory, scored in
  batches), summed with weights from the flags by `Rewards`, which also reports each component.
* the pieces of the losses every stage uses (`clipped_surrogate`, `k3_kl`, `masked_mean`,
  `masked_whiten`), the recipe's common part (`stage_parser`, `setup`), and the RL loop itself
  (`train`: rollout, score, experience, update, log), which each stage drives with its `Algorithm`.

Prompts longer than `--max_seq_len` tokens are cut by `RLAIFDataset` (`ChatEncoder.encode_prompt`):
oldest turns first, never through the generation prompt.
"""

from __future__ import annotations

import argparse
import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
from transformers import (AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer,
                          PreTrainedTokenizerBase)

from dataset.lm_dataset import IGNORE_INDEX, PackedBatches, RLAIFDataset
from dataset.tasks import extract_answer, is_correct
from model.chat_format import THINK_CLOSE, THINK_OPEN, final_answer, thinking_well_formed
from model import loader
from model.cli import add_thinking_switch
from trainer import engine


# ---------------------------------------------------------------------------------------------
# Flags and the common recipe
# ---------------------------------------------------------------------------------------------

def stage_parser(description: str, *, save_weight: str, batch_size: int, ppo_epochs: int) -> argparse.ArgumentParser:
    """The engine's flags with the defaults of MiniMind's RL scripts (from `full_sft`, lr 1e-6, prompts of
    `rlaif-mini.jsonl` up to 256 tokens, responses up to 512, a log line every step), plus `add_rl_args`."""
    parser = engine.stage_parser(description, save_weight=save_weight, from_weight="full_sft", learning_rate=1e-6,
                                 epochs=1, batch_size=batch_size, max_seq_len=256, data_file="rlaif-mini.jsonl",
                                 log_interval=1, save_interval=10)
    add_rl_args(parser, ppo_epochs=ppo_epochs)
    return parser


def add_rl_args(parser: argparse.ArgumentParser, *, ppo_epochs: int) -> None:
    """Flags of sampling, rewards and updates that PPO, GRPO and SPO share. `--max_seq_len` is the
    prompt limit (as in MiniMind's RL scripts); `--batch_size` counts prompts per micro-batch."""
    rollout = parser.add_argument_group("rollout")
    rollout.add_argument("--max_gen_len", type=int, default=512, help="longest response, in tokens")
    rollout.add_argument("--temperature", type=float, default=1.0,
                         help="sampling temperature (> 0); log-probs are taken at the same temperature")
    rollout.add_argument("--top_p", type=float, default=1.0,
                         help="nucleus sampling; below 1 the sampled distribution is no longer the one the ratios use")
    add_thinking_switch(rollout)
    update = parser.add_argument_group("policy update")
    update.add_argument("--ppo_epochs", type=int, default=ppo_epochs,
                        help="optimizer steps over each batch of rollouts; above 1 the ratio clip comes into play")
    update.add_argument("--epsilon", type=float, default=0.2, help="ratio clip below: 1 - eps")
    update.add_argument("--epsilon_high", type=float, default=None,
                        help="ratio clip above: 1 + eps_high (\"clip-higher\", DAPO: 0.28; default: --epsilon)")

    reward = parser.add_argument_group("reward (weighted sum of the components)")
    reward.add_argument("--answer_weight", type=float, default=1.0,
                        help="exact match of the reply with the prompt's \"answer\" field (1 / 0)")
    reward.add_argument("--format_weight", type=float, default=0.5,
                        help="well-formed <think> block, and a final answer the model ended itself (0 .. 1)")
    reward.add_argument("--length_weight", type=float, default=1.0,
                        help="DAPO's overlong penalty: 0 .. -1 over the last --overlong_buffer tokens of --max_gen_len")
    reward.add_argument("--overlong_buffer", type=int, default=None,
                        help="tokens before --max_gen_len where the length penalty starts (default: a quarter of it)")
    reward.add_argument("--reward_model_path", default=None,
                        help="HF reward-model directory (sequence classification, or a model shipping its own code, "
                             "which is then trusted and run); its score is a reward component")
    reward.add_argument("--reward_model_weight", type=float, default=1.0)
    reward.add_argument("--reward_model_clip", type=float, default=3.0, help="reward-model scores are clipped to ±this")


@dataclass
class Setup:
    runtime: engine.Runtime
    tokenizer: PreTrainedTokenizerBase
    policy: torch.nn.Module
    reference: torch.nn.Module
    rewards: "Rewards"
    batches: PackedBatches


def setup(args: argparse.Namespace) -> Setup:
    """Data, runtime, the policy (from `--from_weight`), its frozen copy as the KL reference, rewards."""
    if args.temperature <= 0:
        raise SystemExit("error: --temperature must be > 0 (RL samples; greedy decoding has no log-probs to compare)")
    if args.epsilon_high is None:
        args.epsilon_high = args.epsilon
    data_path = engine.resolve_data_path(args, "rlaif-mini.jsonl", "rlaif.jsonl")
    runtime = engine.setup_runtime(args)
    tokenizer = engine.load_tokenizer(args.tokenizer_path)
    policy = engine.load_model(args, runtime)
    # The reference is the starting policy, copied before any resume state is loaded into the policy.
    reference = engine.freeze(copy.deepcopy(policy), runtime)
    enable_thinking = None if args.open_thinking is None else bool(args.open_thinking)
    dataset = RLAIFDataset(str(data_path), tokenizer, max_length=args.max_seq_len, enable_thinking=enable_thinking)
    return Setup(runtime, tokenizer, policy, reference, build_rewards(args, runtime.device),
                 engine.lm_batches(args, runtime, dataset))


class Algorithm:
    """What an RL stage adds to the loop below: how many responses it samples per prompt, the
    advantages it adds to each batch of experience (with whatever its updates compare against), its
    loss, and (SPO) a look at the policy once the window's updates are done."""
    num_generations = 1

    def add_advantages(self, experience: list[dict]) -> None:
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: dict) -> engine.LossOutput:
        raise NotImplementedError

    def after_updates(self, experience: list[dict]) -> None:
        pass


def train(args: argparse.Namespace, setup: Setup, trainer: engine.Trainer, algorithm: Algorithm) -> None:
    """The RL loop. For each window of `--accumulation_steps` prompt batches:

    1. rollout: sample responses from the current policy;
    2. score: the reward functions give each response one number;
    3. experience: each scored rollout with the reference's log-probs of its responses, to which the
       stage adds its advantages and what its updates compare against (the sampling policy's log-probs);
    4. update: `--ppo_epochs` optimizer steps on those rollouts (each step logs), after which the stage
       may look at the updated policy (SPO: how far it drifted);
    5. save every `--save_interval` steps, between windows, so a resume never needs a lost rollout."""
    if trainer.zero is not None and trainer.zero.stage == 3:
        raise SystemExit("error: --deepspeed: ZeRO-3 shards every weight, so each forward needs all processes, but each "
                         "process samples its own rollouts (a different number of forwards); use "
                         "trainer/ds_config_zero1.json or ds_config_zero2.json for RL")
    if not trainer.start(setup.batches, steps_per_window=args.ppo_epochs):
        return
    for window in trainer.windows(setup.batches):
        rollouts = [sample(setup.policy, setup.tokenizer, prompts, args, setup.runtime, algorithm.num_generations)
                    for prompts in window]
        scores = [setup.rewards(rollout) for rollout in rollouts]
        experience = [experience_batch(rollout, score, setup.reference, args, setup.runtime)
                      for rollout, score in zip(rollouts, scores)]
        algorithm.add_advantages(experience)
        steps_before = trainer.step
        for _ in range(args.ppo_epochs):
            trainer.train_step(experience, algorithm.loss)
            if trainer.done:
                break
        algorithm.after_updates(experience)
        trainer.save_if_due(steps_before)
        if trainer.done:
            break
    trainer.finish()


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------

@dataclass
class Rollout:
    """Sampled responses to a batch of prompts (each prompt repeated `num_generations` times)."""
    input_ids: torch.Tensor       # (N, P + R): left-padded prompt, then the response, padding after its end
    attention_mask: torch.Tensor  # (N, P + R): 1 on prompt and response tokens
    response_mask: torch.Tensor   # (N, R): 1 up to and including the end-of-turn token
    finished: torch.Tensor        # (N,): the response ended itself (False = cut at --max_gen_len)
    prompts: list[str]
    responses: list[str]          # decoded, without the end-of-turn token
    answers: list[str]            # the prompts' verifiable answers ("" where none)

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    def labels(self) -> torch.Tensor:
        """`input_ids` with -100 everywhere but the response tokens: what the policy is scored on."""
        prompt_length = self.input_ids.shape[1] - self.response_mask.shape[1]
        return torch.cat([torch.full_like(self.input_ids[:, :prompt_length], IGNORE_INDEX),
                          self.input_ids[:, prompt_length:].masked_fill(self.response_mask == 0, IGNORE_INDEX)], 1)


@torch.no_grad()
def sample(model: torch.nn.Module, tokenizer, batch: dict, args: argparse.Namespace, runtime: engine.Runtime,
           num_generations: int = 1) -> Rollout:
    """`num_generations` responses per prompt of a left-padded batch, sampled with the KV cache."""
    model = engine.unwrap(model)
    device = runtime.device
    prompt_ids = batch["input_ids"].to(device).repeat_interleave(num_generations, 0)
    prompt_mask = batch["attention_mask"].to(device).repeat_interleave(num_generations, 0)
    was_training = model.training
    model.eval()
    with runtime.autocast():
        # The decode loop of model/generate.py: each row decodes at its own position, so left padding
        # shifts nothing. It samples from torch's global generator (seeded by --seed, its state saved
        # for resume), one draw per step for the rows still running, so a run repeats exactly.
        sequences = loader.generate_batch(model, tokenizer, prompt_ids, prompt_mask, max_new_tokens=args.max_gen_len,
                                          temperature=args.temperature, top_p=args.top_p)
    model.train(was_training)
    responses = sequences[:, prompt_ids.shape[1]:]
    is_stop = torch.isin(responses, torch.tensor(loader.stop_token_ids(model, tokenizer), device=device))
    after_stop = (is_stop.long().cumsum(-1) - is_stop.long()) > 0  # strictly after the first stop token
    response_mask = (~after_stop).long()
    text_lengths = response_mask.sum(-1) - is_stop.any(-1).long()  # the stop token itself is not text
    texts = tokenizer.batch_decode([row[:n] for row, n in zip(responses.tolist(), text_lengths.tolist())],
                                   skip_special_tokens=True)
    prompts = [prompt for prompt in batch["prompt"] for _ in range(num_generations)]
    answers = [answer for answer in batch["answer"] for _ in range(num_generations)]
    return Rollout(input_ids=sequences, attention_mask=torch.cat([prompt_mask, response_mask], 1),
                   response_mask=response_mask.float(), finished=is_stop.any(-1), prompts=prompts, responses=texts,
                   answers=answers)


# ---------------------------------------------------------------------------------------------
# Log-probabilities
# ---------------------------------------------------------------------------------------------

def forward(model: torch.nn.Module, batch: dict):
    """The model on prompt + response, logits kept for the response positions only (and the one
    before the first response token, which predicts it). Positions count real tokens, so a left-
    padded row is computed exactly as it would be alone."""
    attention_mask = batch["attention_mask"]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=batch["input_ids"], attention_mask=attention_mask, position_ids=position_ids,
                 logits_to_keep=batch["response_mask"].shape[1] + 1)


def response_log_probs(logits: torch.Tensor, batch: dict, temperature: float) -> torch.Tensor:
    """log pi(y_t | x, y_<t) at each response position, (N, R), 0 past the response. `logits` are those
    `forward` kept; dividing by the sampling temperature makes pi the distribution the tokens were
    actually drawn from."""
    response_length = batch["response_mask"].shape[1]
    return engine.token_log_probs(logits.float() / temperature, batch["labels"][:, -response_length - 1:])


def response_entropy(logits: torch.Tensor, batch: dict, temperature: float) -> torch.Tensor:
    """Entropy of pi at each response position, (N, R): how much the policy still explores."""
    next_token_logits = logits[:, :-1].detach().float() / temperature
    log_norm = next_token_logits.logsumexp(-1)
    entropy = log_norm - (next_token_logits.softmax(-1) * next_token_logits).sum(-1)
    return entropy * batch["response_mask"]


@torch.no_grad()
def frozen_log_probs(model: torch.nn.Module, batch: dict, args: argparse.Namespace,
                     runtime: engine.Runtime) -> torch.Tensor:
    """Log-probs of the responses under a model that is not being trained right now (the reference,
    or the policy as it was when it sampled)."""
    with runtime.autocast():
        return response_log_probs(forward(engine.unwrap(model), batch).logits, batch, args.temperature)


def rollout_batch(rollout: Rollout) -> dict:
    """The tensors of a rollout that the loss reads, in the engine's batch format: `labels` are -100
    outside the responses."""
    return {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask,
            "response_mask": rollout.response_mask, "labels": rollout.labels()}


@torch.no_grad()
def experience_batch(rollout: Rollout, scores: tuple[torch.Tensor, dict[str, torch.Tensor]],
                     reference: torch.nn.Module, args: argparse.Namespace, runtime: engine.Runtime) -> dict:
    """What every stage's updates read of one scored rollout: its tokens and masks (`labels` are -100
    outside the responses), the reference's log-probs of the responses (for the KL term), the
    responses' rewards and prompts, and the rollout's figures for the log. The stage adds its advantages."""
    rewards, components = scores
    batch = rollout_batch(rollout)
    batch["ref_log_probs"] = frozen_log_probs(reference, batch, args, runtime)
    batch["rewards"], batch["prompts"] = rewards, rollout.prompts
    batch["rollout_metrics"] = rollout_metrics(rollout, rewards, components)
    return batch


# ---------------------------------------------------------------------------------------------
# Loss pieces
# ---------------------------------------------------------------------------------------------

def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean and unit variance over the masked entries (PPO's advantage whitening)."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(variance + eps) * mask


def clipped_surrogate(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                      epsilon_low: float, epsilon_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's per-token loss -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A), and where the
    clip took the gradient away (ratio already past the bound in the direction A pushes it).

    The min makes the objective pessimistic: moving a token's probability further than the trust
    region in the direction the advantage favours earns nothing, so several steps on one batch of
    rollouts cannot run away from the policy that sampled them."""
    ratio = torch.exp(log_probs - old_log_probs)
    clipped_ratio = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped_ratio * advantages)
    clipped = ((ratio < 1 - epsilon_low) & (advantages < 0)) | ((ratio > 1 + epsilon_high) & (advantages > 0))
    return loss, clipped


def k3_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per sampled token: exp(d) - d - 1 with d = log ref - log pi.
    Unbiased, and unlike log pi - log ref never negative."""
    delta = ref_log_probs - log_probs
    return torch.exp(delta) - delta - 1


def critic_free_loss(model: torch.nn.Module, batch: dict, args: argparse.Namespace,
                     surrogate: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> engine.LossOutput:
    """The loss of GRPO and SPO: `surrogate(log_probs, old_log_probs, advantages)` per response token
    (one advantage per response) plus `args.beta` * k3 KL to the reference, summed over the response
    tokens; the engine divides by the step's token count. Without old log-probs (one update per
    rollout batch) the policy is its own pi_old: ratio 1, the plain policy gradient."""
    out = forward(model, batch)
    log_probs = response_log_probs(out.logits, batch, args.temperature)
    mask = batch["response_mask"]
    old_log_probs = log_probs.detach() if batch["old_log_probs"] is None else batch["old_log_probs"]
    per_token, clipped = surrogate(log_probs, old_log_probs, batch["advantages"][:, None])
    per_token = per_token + args.beta * k3_kl(log_probs, batch["ref_log_probs"])
    entropy = response_entropy(out.logits, batch, args.temperature)
    return engine.LossOutput(loss_sum=(per_token * mask).sum(), count=int(mask.sum()), aux_loss=out.aux_loss,
                             metrics=update_metrics(batch, mask, clipped, log_probs, entropy))


def update_metrics(batch: dict, mask: torch.Tensor, clipped: torch.Tensor, log_probs: torch.Tensor,
                   entropy: torch.Tensor) -> dict[str, float]:
    """What every stage logs per optimizer step: the rollout's figures, plus the clip fraction, the
    entropy and KL(policy || reference) of the policy being updated."""
    return {**batch["rollout_metrics"],
            "clip_frac": float(masked_mean(clipped.float(), mask)),
            "entropy": float(masked_mean(entropy, mask)),
            "kl": float(masked_mean(k3_kl(log_probs.detach(), batch["ref_log_probs"]), mask))}


def rollout_metrics(rollout: Rollout, reward: torch.Tensor, components: dict[str, torch.Tensor]) -> dict[str, float]:
    return {"reward": float(reward.mean()),
            **{f"reward_{name}": float(values.mean()) for name, values in components.items()},
            "response_length": float(rollout.response_lengths.mean()),
            "finished": float(rollout.finished.float().mean())}


# ---------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------

class RewardComponent(Protocol):
    """One score per response. `low`/`high` bound it (SPO maps the total onto [0, 1] with them)."""
    name: str
    low: float
    high: float

    def __call__(self, rollout: Rollout) -> torch.Tensor: ...


class AnswerReward:
    """1 when the reply states the prompt's verifiable `answer` (`dataset.tasks.is_correct`, the same
    check as evaluation), else 0. Prompts without an answer score 0."""
    name, low, high = "answer", 0.0, 1.0

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        return torch.tensor([float(bool(answer) and is_correct(response, answer))
                             for response, answer in zip(rollout.responses, rollout.answers)])


class FormatReward:
    """0.5 for a well-formed reasoning block, 0.5 for a final answer the model ended itself.

    Well-formed: the reply opens with `<think>`, closes it once with `</think>`, and opens no other.
    When the prompt already holds the (empty) block (`--open_thinking 0`), well-formed means no think
    tags at all. The answer half needs non-empty text after the block and an end-of-turn token."""
    name, low, high = "format", 0.0, 1.0

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        scores = []
        for prompt, response, finished in zip(rollout.prompts, rollout.responses, rollout.finished.tolist()):
            if prompt.rstrip().endswith(THINK_CLOSE):
                thinking_ok = THINK_OPEN not in response and THINK_CLOSE not in response  # nothing left to open
            else:
                thinking_ok = thinking_well_formed(response)
            answer_ok = finished and bool(extract_answer(response))
            scores.append(0.5 * thinking_ok + 0.5 * answer_ok)
        return torch.tensor(scores)


class LengthPenalty:
    """DAPO's soft overlong punishment: 0 up to `max_len - buffer` tokens, then falling linearly to -1
    at `max_len`, where a reply that never ended is cut off."""
    name, low, high = "length", -1.0, 0.0

    def __init__(self, max_len: int, buffer: int):
        self.max_len, self.buffer = max_len, max(buffer, 1)

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        lengths = rollout.response_lengths.float().cpu()
        return ((self.max_len - self.buffer - lengths) / self.buffer).clamp(-1.0, 0.0)


_CHATML_TURN = re.compile(r"<\|im_start\|>(system|user|assistant|tool)\n(.*?)<\|im_end\|>", re.DOTALL)


class ModelReward:
    """A learned reward model: any HF directory holding a sequence-classification model with one label
    (or a custom reward model whose outputs' first field is the score), and its tokenizer.

    The conversation is rebuilt from the ChatML prompt, the reply's final answer (a reasoning block
    dropped, as R1 scores helpfulness) appended as the assistant turn, rendered with the reward
    model's own chat template, and all replies are scored in one padded batch. Scores are clipped to
    ±`clip` so one outlier cannot dominate the advantages."""
    name = "model"

    def __init__(self, path: str | Path, device: torch.device, clip: float = 3.0):
        path = loader.resolve_path(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.truncation_side = "left"  # keep the reply when a conversation is too long
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        config = AutoConfig.from_pretrained(path, trust_remote_code=True)
        if any(name.endswith("ForSequenceClassification") for name in config.architectures or []) \
                or not getattr(config, "auto_map", None):
            self.model = AutoModelForSequenceClassification.from_pretrained(path)
        else:  # a reward model shipping its own code (InternLM2-Reward, ...)
            self.model = AutoModel.from_pretrained(path, trust_remote_code=True)
        self.model.to(device).eval().requires_grad_(False)
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.max_length = min(self.tokenizer.model_max_length,
                              getattr(self.model.config, "max_position_embeddings", None) or 10 ** 9)
        self.device, self.low, self.high = device, -clip, clip

    def conversation_text(self, prompt: str, response: str) -> str:
        answer = final_answer(response).strip()
        messages = [{"role": role, "content": content} for role, content in _CHATML_TURN.findall(prompt)]
        if not messages or not self.tokenizer.chat_template:
            return prompt + answer
        return self.tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)

    @torch.no_grad()
    def __call__(self, rollout: Rollout) -> torch.Tensor:
        texts = [self.conversation_text(prompt, response) for prompt, response in zip(rollout.prompts, rollout.responses)]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="right", truncation=True,
                               max_length=self.max_length, add_special_tokens=False).to(self.device)
        output = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        scores = output.logits if hasattr(output, "logits") else output[0]
        return scores.float().reshape(len(texts), -1)[:, 0].clamp(self.low, self.high).cpu()


class Rewards:
    """The weighted sum of reward components. Calling it returns the total and each component's
    (unweighted) scores, which are logged as `reward_<name>`."""

    def __init__(self, weighted: list[tuple[float, RewardComponent]]):
        if not weighted:
            raise SystemExit("error: every reward weight is 0: nothing to learn from")
        self.weighted = weighted

    def __call__(self, rollout: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        components = {component.name: component(rollout).float() for _, component in self.weighted}
        total = sum(weight * components[component.name] for weight, component in self.weighted)
        return total, components

    @property
    def bounds(self) -> tuple[float, float]:
        """The lowest and highest total any response can get."""
        low = sum(min(weight * c.low, weight * c.high) for weight, c in self.weighted)
        high = sum(max(weight * c.low, weight * c.high) for weight, c in self.weighted)
        return low, high


def build_rewards(args: argparse.Namespace, device: torch.device) -> Rewards:
    buffer = args.overlong_buffer if args.overlong_buffer is not None else args.max_gen_len // 4
    candidates = [(args.answer_weight, lambda: AnswerReward()),
                  (args.format_weight, lambda: FormatReward()),
                  (args.length_weight, lambda: LengthPenalty(args.max_gen_len, buffer))]
    if args.reward_model_path:
        candidates.append((args.reward_model_weight,
                           lambda: ModelReward(args.reward_model_path, device, args.reward_model_clip)))
    return Rewards([(weight, make()) for weight, make in candidates if weight != 0])

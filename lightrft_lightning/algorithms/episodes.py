"""`MultiTurnRollout`: episodes of model turns, tool calls and environment answers, each kept as ONE
token sequence (token in, token out).

Every model turn is the engine's tokens as sampled (never decoded and re-encoded); every answer
(tool results, the environment's observation) is the chat template applied to the new messages only,
rendered as the suffix that follows the tokens the engine already holds (:class:`ChatSuffix`). The
learner trains on exactly the sequence the engine was fed and generated: model tokens carry loss mask
1 and the engine's log-probs (``Experience.rollout_logp``), environment and tool tokens mask 0.

Rewards: an episode's reward is the sum of its environment's per-turn rewards plus, when the rollout
has reward functions, their score of the last model turn. It is the sequence reward every advantage
estimator takes (``Experience.rewards``): group estimators (GRPO, RLOO, CPGD, REINFORCE baseline)
compare it within the prompt's group and spread the advantage over all model tokens; PPO's GAE puts it
on the last model token (per-turn rewards are not placed at their own turn's tokens).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Sequence, Union

import lightning.pytorch as pl
import torch

from lightrft_lightning.algorithms.environments import Environment, Message, Observation, Step
from lightrft_lightning.algorithms.experience import Experience
from lightrft_lightning.algorithms.rewards import CombinedReward, load_function
from lightrft_lightning.algorithms.rollout import Rollout, row_metadata
from lightrft_lightning.algorithms.tools import call_tool, parse_tool_calls, tool_schema, tool_system_text
from lightrft_lightning.data import render_prompts
from lightrft_lightning.engines.base import Completion, SamplingParams

Generate = Callable[[list[list[int]], SamplingParams], list[Completion]]
FINISH_REASONS = ("done", "max_turns", "max_total_tokens")
_MARK = "\x00MODEL_TURN\x00"


class ChatSuffix:
    """The chat template applied to new messages only, as the tokens that follow a model turn.

    A fixed conversation ending with an assistant turn is rendered with and without the new messages
    (and the generation prompt); the difference is the new messages' text. What the template writes
    after an assistant's content (SmolLM2: ``<|im_end|>\\n``) closes the model's turn: when the model
    stopped on the EOS token the rest of it (``\\n``, the separator verl#3720 dropped) starts the
    suffix, when it was cut at its token budget all of it does."""

    def __init__(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("MultiTurnRollout: the tokenizer has no chat template, which episodes of more than one "
                             "turn need; accepted: a tokenizer with a chat_template (an instruct model's), or max_turns=1")
        self.tokenizer = tokenizer
        self.closed = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                       {"role": "assistant", "content": _MARK}]
        self.head = self._render(self.closed, False)
        self.turn_end = self.head[self.head.rindex(_MARK) + len(_MARK):]

    def _render(self, messages: list[Message], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def tokens(self, messages: list[Message], completion: Completion) -> list[int]:
        """The token ids of ``messages`` and the next generation prompt, after ``completion``."""
        full = self._render(self.closed + list(messages), True)
        if not full.startswith(self.head):
            raise ValueError("MultiTurnRollout: the chat template rewrites earlier turns when messages are added, so a "
                             "new turn is not a suffix of the sequence; accepted: a template that appends turns")
        close = self.turn_end
        if completion.finish_reason == "eos" and completion.token_ids:
            eos = self.tokenizer.decode(completion.token_ids[-1:])
            if not close.startswith(eos):
                raise ValueError(f"MultiTurnRollout: the model's turn ended with {eos!r} but the chat template closes an "
                                 f"assistant turn with {close!r}; accepted: an engine whose EOS token is the template's "
                                 "end of turn")
            close = close[len(eos):]
        return list(self.tokenizer(close + full[len(self.head):], add_special_tokens=False)["input_ids"])


@dataclass
class Episode:
    """One trajectory: ``token_ids`` (prompt, then turns and answers), ``loss_mask`` (1 on model
    tokens), ``logprobs`` (the engine's, 0 elsewhere), the per-turn rewards and counters."""

    token_ids: list[int]
    prompt_len: int
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    finish_reason: str = ""
    last_text: str = ""
    has_logprobs: bool = True

    def __post_init__(self) -> None:
        self.loss_mask = [0] * len(self.token_ids)
        self.logprobs = [0.0] * len(self.token_ids)

    def add(self, token_ids: Sequence[int], model: bool, logprobs: Sequence[float] = ()) -> None:
        self.token_ids += token_ids
        self.loss_mask += [int(model)] * len(token_ids)
        if model and len(logprobs) != len(token_ids):
            self.has_logprobs = False
        self.logprobs += list(logprobs) if model and self.has_logprobs else [0.0] * len(token_ids)


class MultiTurnRollout(Rollout):
    """Episodes against an :class:`~lightrft_lightning.algorithms.environments.Environment`, with tools:
    ``n_samples_per_prompt`` episodes per row, each a new environment instance ``reset`` on the row.
    A model turn with ``<tool_call>`` blocks is answered with the tools' results (failures as error
    text, counted), any other by the environment's ``step``. An episode ends when the environment says
    done, after ``max_turns`` model turns, or when the next answer would not leave one token under
    ``max_total_tokens``; ``max_new_tokens`` caps each turn.

    Logged: ``episode/turns``, ``episode/tool_calls`` and ``episode/tool_errors`` (means per episode),
    ``episode/budget_cut`` (the fraction cut by a budget), ``episode/finish/<reason>`` and
    ``reward/env/<environment>`` (the mean episode reward).

    Args:
        environment: the environment class (or any factory), or its import path ``"package.module:Class"``;
            None: :class:`~lightrft_lightning.algorithms.environments.Environment`, the one-turn case.
        environment_kwargs: keyword arguments of each ``environment(...)`` call.
        max_turns: model turns per episode at most.
        max_total_tokens: tokens per episode (prompt included) at most.
        tool_timeout_s: a tool call running longer answers with a timeout error.
        rewards: reward functions scoring the last model turn, added to the environment's rewards
            (default: none).
        **kwargs: :class:`~lightrft_lightning.algorithms.rollout.Rollout`'s other arguments.
    """

    def __init__(self, environment: Union[str, Callable[..., Environment], None] = None,
                 environment_kwargs: Optional[dict[str, Any]] = None, max_turns: int = 4, max_total_tokens: int = 1024,
                 tool_timeout_s: float = 10.0, rewards: Optional[dict[str, float]] = None, **kwargs: Any) -> None:
        super().__init__(rewards={} if rewards is None else rewards, **kwargs)
        self.environment, self.environment_kwargs = environment, dict(environment_kwargs or {})
        self.max_turns, self.max_total_tokens, self.tool_timeout_s = max_turns, max_total_tokens, tool_timeout_s
        self.chat: Optional[ChatSuffix] = None

    def check(self, owner: str) -> None:
        super().check(owner)
        for name, low in (("max_turns", 1), ("max_total_tokens", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{owner}.{name}={value!r} is invalid; accepted: an integer >= {low}")
        value = self.tool_timeout_s
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ValueError(f"{owner}.tool_timeout_s={value!r} is invalid; accepted: a number > 0 (finite)")
        factory = self._factory(owner)
        if not isinstance(factory(**self.environment_kwargs), Environment):
            raise ValueError(f"{owner}.environment={self.environment!r} does not make an Environment; accepted: an "
                             "Environment subclass or its import path 'package.module:Class'")

    def _factory(self, owner: str = "MultiTurnRollout") -> Callable[..., Environment]:
        if self.environment is None:
            return Environment
        if isinstance(self.environment, str):
            try:
                return load_function(self.environment)
            except Exception as err:
                raise ValueError(f"{owner}.environment={self.environment!r} cannot be loaded ({err}); accepted: an "
                                 "import path 'package.module:Class'") from err
        if not callable(self.environment):
            raise ValueError(f"{owner}.environment={self.environment!r} is invalid; accepted: an Environment class, a "
                             "factory or an import path 'package.module:Class'")
        return self.environment

    def bind(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.reward_fn = CombinedReward(self.rewards) if self.rewards else None
        self.chat = ChatSuffix(tokenizer) if self.max_turns > 1 else None

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"reward_fn": self.reward_fn} if self.reward_fn is not None else {}

    # ------------------------------------------------------------------ episodes
    def render_first(self, observations: list[Observation], tools: list[Callable]) -> tuple[list[str], list[list[int]]]:
        """The first prompts' texts and ids: plain prompts as :func:`render_prompts` renders them, messages
        with the chat template, tools offered through its ``tools=`` or, where the template ignores
        them, in a system message in the documented format (:data:`~lightrft_lightning.algorithms.tools.TOOL_PROMPT`)."""
        if not tools:
            rows = [{"prompt": o} if isinstance(o, str) else {"messages": o} for o in observations]
            return render_prompts(rows, self.tokenizer, self.apply_chat_template)
        schemas = [tool_schema(fn) for fn in tools]
        conversations = [[{"role": "user", "content": o}] if isinstance(o, str) else list(o) for o in observations]
        apply = self.tokenizer.apply_chat_template
        probe = [{"role": "user", "content": "x"}]
        if apply(probe, tools=schemas, tokenize=False) == apply(probe, tokenize=False):  # the template ignores tools
            offer = tool_system_text(tools)
            conversations = [[{"role": "system", "content": c[0]["content"] + "\n\n" + offer}, *c[1:]]
                             if c and c[0]["role"] == "system" else [{"role": "system", "content": offer}, *c]
                             for c in conversations]
            schemas = None
        texts = [apply(c, tools=schemas, tokenize=False, add_generation_prompt=True) for c in conversations]
        return texts, [list(x) for x in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def run_episodes(self, generate: Generate, rows: list[dict[str, Any]],
                     params: Optional[SamplingParams] = None) -> tuple[list[str], list[Episode]]:
        """``params.n`` episodes per row with ``generate`` (an engine's, or the rollout callback's): the
        first prompts' texts and the episodes, grouped by row. ``params`` defaults to the rollout's."""
        params = params or self.sampling_params()
        n, factory = params.n, self._factory()
        envs = [factory(**self.environment_kwargs) for _ in range(len(rows) * n)]
        observations = [env.reset(rows[i // n]) for i, env in enumerate(envs)]
        tools = list(envs[0].tools) if envs else []
        by_name = {fn.__name__: fn for fn in tools}
        texts, prompt_ids = self.render_first(observations[::n], tools)
        episodes = [Episode(list(prompt_ids[i // n]), len(prompt_ids[i // n])) for i in range(len(envs))]
        for i, ids in enumerate(prompt_ids):
            if len(ids) >= self.max_total_tokens:
                raise ValueError(f"MultiTurnRollout: row {i}'s first prompt has {len(ids)} tokens, max_total_tokens="
                                 f"{self.max_total_tokens} leaves none to generate; accepted: a larger max_total_tokens")
        # the first turn: each prompt once, with n samples (the single-turn rollout's call)
        completions = self._generate(generate, prompt_ids, params, list(range(0, len(envs), n)), episodes)
        active = list(range(len(envs)))
        while active:
            following = []
            for i, completion in zip(active, completions):
                ep = episodes[i]
                ep.add(completion.token_ids, True, completion.logprobs)
                ep.turns += 1
                ep.last_text = self.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
                observation, done = self._answer(envs[i], ep, by_name)
                if done:
                    ep.finish_reason = "done"
                elif ep.turns >= self.max_turns:
                    ep.finish_reason = "max_turns"
                else:
                    suffix = self.chat.tokens(observation, completion)
                    if len(ep.token_ids) + len(suffix) >= self.max_total_tokens:
                        ep.finish_reason = "max_total_tokens"
                    else:
                        ep.add(suffix, False)
                        following.append(i)
            active = following
            completions = self._generate(generate, [episodes[i].token_ids for i in active], replace(params, n=1), active,
                                         episodes)
        return texts, episodes

    def _generate(self, generate: Generate, prompts: list[list[int]], params: SamplingParams, owners: list[int],
                  episodes: list[Episode]) -> list[Completion]:
        """Completions for ``prompts`` (``params.n`` each, in order), each turn capped by what its episode
        (``owners``: the index of each prompt's first episode) has left of ``max_total_tokens``; one
        engine call per distinct cap."""
        if not prompts:
            return []
        caps = [min(params.max_new_tokens, self.max_total_tokens - len(episodes[o].token_ids)) for o in owners]
        out: list[Optional[Completion]] = [None] * (len(prompts) * params.n)
        for cap in sorted(set(caps), reverse=True):
            index = [k for k, c in enumerate(caps) if c == cap]
            for c in generate([prompts[k] for k in index], replace(params, max_new_tokens=cap)):
                k = index[c.prompt_index]
                slot = next(s for s in range(k * params.n, (k + 1) * params.n) if out[s] is None)
                out[slot] = Completion(k, c.token_ids, c.logprobs, c.finish_reason)
        return out  # type: ignore[return-value]

    def _answer(self, env: Environment, ep: Episode, tools: dict[str, Callable]) -> tuple[list[Message], bool]:
        """The messages that answer the episode's last turn, and whether it is done: the tools' results
        when it calls any, else the environment's step (its reward recorded)."""
        calls = parse_tool_calls(ep.last_text) if tools else []
        if calls:
            answers = []
            for call in calls:
                content, failed = call_tool(tools, call, self.tool_timeout_s)
                ep.tool_calls += 1
                ep.tool_errors += int(failed)
                answers.append({"role": "tool", "name": call.name, "content": content})
            return answers, False
        step = env.step(ep.last_text)
        if not isinstance(step, Step):
            raise TypeError(f"{type(env).__name__}.step returned {type(step).__name__}; accepted: a Step(observation, "
                            "reward, done)")
        ep.rewards.append(float(step.reward))
        return list(step.observation), bool(step.done)

    # ------------------------------------------------------------------ the rollout
    @torch.no_grad()
    def __call__(self, module: pl.LightningModule, rows: list[dict[str, Any]]) -> tuple[Experience, dict[str, float]]:
        from lightrft_lightning.callbacks import find_rollout_callback

        callback = find_rollout_callback(module.trainer)
        engine_s = 0.0

        def generate(prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
            nonlocal engine_s
            start = time.perf_counter()
            try:
                return callback.generate(module, prompts, params)
            finally:
                engine_s += time.perf_counter() - start

        t0 = time.perf_counter()
        prompts, episodes = self.run_episodes(generate, rows)
        t1 = time.perf_counter()
        exp = pack_episodes(episodes, self.tokenizer.pad_token_id, module.device)
        n = self.n_samples_per_prompt
        rewards = torch.tensor([sum(ep.rewards) for ep in episodes], dtype=torch.float32)
        metrics = {"time/generate": engine_s, "time/environment": t1 - t0 - engine_s}
        sample_prompts = [prompts[i // n] for i in range(len(episodes))]
        if self.reward_fn is not None:
            scores = self.reward_fn.scores(sample_prompts, [ep.last_text for ep in episodes],
                                           [row_metadata(rows[i // n]) for i in range(len(episodes))])
            rewards = rewards + self.reward_fn.combine(scores)
            names = self.reward_fn.short_names()
            metrics.update({f"reward/{names[name]}": float(v.mean()) for name, v in scores.items()})
        metrics["time/score"] = time.perf_counter() - t1
        groups = rewards.view(-1, n)
        metrics["groups/all_tied"] = float((groups == groups[:, :1]).all(dim=1).float().mean())
        metrics.update(episode_metrics(episodes, rewards, self._env_name()))
        responses = self.tokenizer.batch_decode([ep.token_ids[ep.prompt_len:] for ep in episodes])
        self._write_samples(module.trainer, sample_prompts, responses, rewards)
        exp.rewards = rewards.to(module.device)
        return exp, metrics

    def _env_name(self) -> str:
        factory = self._factory()
        return getattr(factory, "__name__", type(factory).__name__)


def pack_episodes(episodes: list[Episode], pad_token_id: int, device: Any = "cpu") -> Experience:
    """Right-padded ``[N, L]`` ids and attention mask, the ``[N, L-1]`` action mask (1 where the next
    token is the model's) and the engine's log-probs there (None when an engine gave none)."""
    length = max(len(ep.token_ids) for ep in episodes)
    ids = torch.full((len(episodes), length), pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    action = torch.zeros((len(episodes), length - 1), dtype=torch.float32)
    logp = torch.zeros_like(action)
    for i, ep in enumerate(episodes):
        ids[i, : len(ep.token_ids)] = torch.tensor(ep.token_ids)
        attn[i, : len(ep.token_ids)] = 1
        action[i, : len(ep.token_ids) - 1] = torch.tensor(ep.loss_mask[1:], dtype=torch.float32)
        logp[i, : len(ep.token_ids) - 1] = torch.tensor(ep.logprobs[1:], dtype=torch.float32)
    exp = Experience(ids.to(device), attn.to(device), action.to(device))
    exp.rollout_logp = logp.to(device) if all(ep.has_logprobs for ep in episodes) else None
    return exp


def episode_metrics(episodes: list[Episode], rewards: torch.Tensor, env_name: str) -> dict[str, float]:
    """Means per episode of turns, tool calls and tool errors; the fraction cut by a budget and per
    finish reason; the mean episode reward under ``reward/env/<env_name>``."""
    count = len(episodes)
    finish: dict[str, int] = defaultdict(int)
    for ep in episodes:
        finish[ep.finish_reason] += 1
    metrics = {"episode/turns": sum(ep.turns for ep in episodes) / count,
               "episode/tool_calls": sum(ep.tool_calls for ep in episodes) / count,
               "episode/tool_errors": sum(ep.tool_errors for ep in episodes) / count,
               "episode/budget_cut": (count - finish["done"]) / count,
               f"reward/env/{env_name}": float(rewards.mean())}
    metrics.update({f"episode/finish/{reason}": finish[reason] / count for reason in FINISH_REASONS})
    return metrics

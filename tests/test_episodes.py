"""Multi-turn episodes (MultiTurnRollout): one token sequence per episode equal to what the engine was fed
and generated, with the real SmolLM2 chat template; loss mask and the engine's log-probs; tools that
raise, hang or are called badly; each budget; and single-turn GRPO as the one-turn case."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightrft_lightning import LightRFTFake, pretrained
from lightrft_lightning.algorithms import GRPOLoss, Policy, RLModule, Rollout, Training
from lightrft_lightning.algorithms.environments import Environment, Step
from lightrft_lightning.algorithms.episodes import MultiTurnRollout, episode_metrics, pack_episodes
from lightrft_lightning.data import PromptDataModule
from lightrft_lightning.engines.base import Completion, SamplingParams
from lightrft_lightning.engines.hf import HFEngine
from lightrft_lightning.tasks import counting_prompts

torch.set_num_threads(1)


class Retry(Environment):
    """Answers every turn with feedback until the fourth; reward 0.5 per turn."""

    def reset(self, row):
        self.turn = 0
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, completion):
        self.turn += 1
        return Step([{"role": "user", "content": f"Wrong ({self.turn}), try again."}], reward=0.5, done=self.turn >= 4)


def boom(x: int) -> int:
    """Raises.

    Args:
        x: anything
    """
    raise ZeroDivisionError("no")


def hang(x: int) -> int:
    """Sleeps past the timeout.

    Args:
        x: anything
    """
    time.sleep(3)
    return x


def add(a: int, b: int) -> int:
    """Adds.

    Args:
        a: a number
        b: another
    """
    return a + b


class WithTools(Retry):
    tools = [boom, hang, add]


@pytest.fixture(scope="module")
def smollm2():
    path = pretrained.resolve("smollm2-135m-instruct")
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


class Recording:
    """An engine's generate that keeps every call's prompts and completions."""

    def __init__(self, generate):
        self.generate, self.calls = generate, []

    def __call__(self, prompts, params):
        out = self.generate(prompts, params)
        self.calls.append(([list(p) for p in prompts], params.n, out))
        return out


def test_episode_is_the_engines_tokens_with_the_real_chat_template(smollm2):
    tok, model = smollm2
    engine = HFEngine(model, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    rollout = MultiTurnRollout(Retry, max_turns=3, max_new_tokens=12, max_total_tokens=400)
    rollout.bind(tok)
    record = Recording(engine.generate)
    rows = [{"prompt": "What is 2 + 3?"}, {"prompt": "Name a color."}]
    torch.manual_seed(0)
    _, episodes = rollout.run_episodes(record, rows, SamplingParams(n=2, temperature=1.0, max_new_tokens=12))
    assert [ep.turns for ep in episodes] == [3] * 4 and {ep.finish_reason for ep in episodes} == {"max_turns"}
    # every call's prompt is a prefix of its episode, and its completion follows it token for token
    seen = {i: [] for i in range(4)}
    for call, (prompts, n, out) in enumerate(record.calls):
        owners = [0, 1, 2, 3] if call == 0 else [i for i in range(4) if len(seen[i]) == call]
        assert len(out) == len(owners)
        for i, c in zip(owners, out):
            ep, prompt = episodes[i], prompts[c.prompt_index]
            end = len(prompt) + len(c.token_ids)
            assert ep.token_ids[:end] == prompt + c.token_ids
            assert ep.loss_mask[len(prompt):end] == [1] * len(c.token_ids)
            assert ep.logprobs[len(prompt):end] == c.logprobs  # the engine's, untouched
            seen[i].append((len(prompt), end))
    for i, ep in enumerate(episodes):  # everything else is prompt / environment: mask 0
        model_positions = {p for start, end in seen[i] for p in range(start, end)}
        assert all(m == (p in model_positions) for p, m in enumerate(ep.loss_mask))
        # the sequence is the chat template of the whole conversation (no separator dropped)
        conversation = [{"role": "user", "content": rows[i // 2]["prompt"]}]
        for turn, (start, end) in enumerate(seen[i]):
            ids = ep.token_ids[start:end]
            ids = ids[:-1] if ids[-1] == tok.eos_token_id else ids
            conversation.append({"role": "assistant", "content": tok.decode(ids)})
            if turn < 2:
                conversation.append({"role": "user", "content": f"Wrong ({turn + 1}), try again."})
        text, template = tok.decode(ep.token_ids), tok.apply_chat_template(conversation, tokenize=False)
        closed = ep.token_ids[-1] == tok.eos_token_id  # the last turn is not closed by an answer
        assert text + ("\n" if closed else "<|im_end|>\n") == template
        assert ep.rewards == [0.5, 0.5, 0.5]
    exp = pack_episodes(episodes, tok.pad_token_id)
    for i, ep in enumerate(episodes):  # [N, L-1]: position p predicts token p+1
        length = len(ep.token_ids)
        assert exp.action_mask[i, : length - 1].tolist() == ep.loss_mask[1:]
        assert torch.equal(exp.rollout_logp[i, : length - 1], torch.tensor(ep.logprobs[1:]))


def scripted(tok, turns: list[str]):
    """A generate that answers turn k of every episode with ``turns[k]`` (the model's choices, scripted)."""
    def generate(prompts, params):
        out = []
        for k, prompt in enumerate(prompts):
            turn = tok.decode(prompt).count("<|im_start|>assistant") - 1  # the model's turns so far
            ids = tok(turns[turn], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = ids[: params.max_new_tokens]
            for _ in range(params.n):
                out.append(Completion(k, ids, [-0.5] * len(ids), "eos" if len(ids) and ids[-1] == tok.eos_token_id
                                      else "length"))
        return out
    return generate


def test_tools_raising_hanging_malformed_and_bad_arguments_answer_with_errors(smollm2):
    tok, _ = smollm2
    turns = ['<tool_call>{"name": "boom", "arguments": {"x": 1}}</tool_call>',
             '<tool_call>{"name": "hang", "arguments": {"x": 1}}</tool_call>',
             '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call><tool_call>{"name": add</tool_call>',
             '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>', "5", "5"]
    rollout = MultiTurnRollout(WithTools, max_turns=6, max_new_tokens=64, max_total_tokens=2000, tool_timeout_s=0.2)
    rollout.bind(tok)
    texts, episodes = rollout.run_episodes(scripted(tok, turns), [{"prompt": "2+3?"}],
                                           SamplingParams(n=1, max_new_tokens=64))
    ep = episodes[0]
    assert "<tool_call>" in texts[0] and '"name": "add"' in texts[0]  # offered in the documented format
    assert (ep.turns, ep.tool_calls, ep.tool_errors, ep.finish_reason) == (6, 5, 4, "max_turns")
    assert ep.rewards == [0.5, 0.5]  # the environment saw only the turns without tool calls
    text = tok.decode(ep.token_ids)
    for error in ("ZeroDivisionError: no", "hang timed out after 0.2 s", "bad arguments for add",
                  "not valid JSON"):
        assert error in text
    assert "<|im_start|>tool\n3<|im_end|>" in text  # the good call's result
    metrics = episode_metrics(episodes, torch.tensor([1.0]), "WithTools")
    assert metrics["episode/tool_errors"] == 4 and metrics["episode/budget_cut"] == 1.0


@pytest.mark.parametrize("budget", ["max_turns", "max_total_tokens", "done"])
def test_each_budget_ends_an_episode_with_its_reason(smollm2, budget):
    tok, _ = smollm2
    kwargs = {"max_turns": {"max_turns": 2}, "max_total_tokens": {"max_total_tokens": 60},
              "done": {}}[budget]
    rollout = MultiTurnRollout(Retry, max_new_tokens=8, **{"max_turns": 10, "max_total_tokens": 4000, **kwargs})
    rollout.bind(tok)
    _, episodes = rollout.run_episodes(scripted(tok, ["one two three four"] * 10), [{"prompt": "hi"}],
                                       SamplingParams(n=2, max_new_tokens=8))
    ep = episodes[0]
    assert ep.finish_reason == budget
    assert ep.turns == {"max_turns": 2, "done": 4}.get(budget, ep.turns)
    assert len(ep.token_ids) <= rollout.max_total_tokens
    if budget == "max_total_tokens":
        assert 1 < ep.turns < 4


def grpo(rollout) -> list[torch.Tensor]:
    pl.seed_everything(0, verbose=False)
    module = RLModule(GRPOLoss(), Policy(tokenizer_chars="0123456789", model_config={"hidden_size": 32}), rollout,
                      training=Training(micro_train_batch_size=4, actor_learning_rate=1e-2))
    trainer = pl.Trainer(accelerator="cpu", strategy=LightRFTFake({"bf16": False}), max_steps=2, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(module, PromptDataModule(prompts=counting_prompts(16, seed=3), batch_size=2, seed=1))
    return [p.detach().clone() for p in module.actor.parameters()]


def test_one_turn_grpo_equals_single_turn_rollout():
    rewards = {"lightrft_lightning.tasks:counting_reward": 1.0}
    before = grpo(Rollout(rewards=rewards, n_samples_per_prompt=4, max_new_tokens=4))
    after = grpo(MultiTurnRollout(rewards=rewards, n_samples_per_prompt=4, max_new_tokens=4, max_turns=1))
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert not all(torch.equal(a, b) for a, b in zip(before, grpo(Rollout(rewards=rewards, n_samples_per_prompt=4,
                                                                           max_new_tokens=3))))


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="r.max_turns=0"):
        MultiTurnRollout(max_turns=0).check("r")
    with pytest.raises(ValueError, match="r.tool_timeout_s"):
        MultiTurnRollout(tool_timeout_s=0).check("r")
    with pytest.raises(ValueError, match="r.environment='nope:X' cannot be loaded"):
        MultiTurnRollout(environment="nope:X").check("r")
    with pytest.raises(ValueError, match="does not make an Environment"):
        MultiTurnRollout(environment=dict).check("r")


@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_two_ranks_equal_one_process_on_multi_turn_grpo(strategy, tmp_path):
    """tests/scripts/multiturn_grpo.py: greedy feedback episodes, 2 steps, on 2 ranks against one process."""
    import json
    import sys

    from tests.launch import SCRIPTS, torchrun

    sys.path.insert(0, str(SCRIPTS))
    import multiturn_grpo

    out = tmp_path / "steps.json"
    torchrun("multiturn_grpo.py", 2, strategy, str(out), env={"PYTHONPATH": str(SCRIPTS.parents[1])}, timeout=300)
    ranks, one = json.loads(out.read_text()), multiturn_grpo.run("fake")
    assert len(ranks) == len(one) == 2 and all(s["episode/turns"] == 3 and s["loss/policy"] != 0 for s in one)
    for got, ref in zip(ranks, one):  # step 2's loss is under the weights step 1 made
        for key in ("loss/policy", "reward", "reward_std", "response_length", "episode/turns"):
            assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key


def test_builtin_tasks_calculator_and_retry():
    from lightrft_lightning.agent_tasks import CalculatorArithmetic, RetryArithmetic, calculator
    from lightrft_lightning.algorithms.tools import ToolCall, call_tool

    assert (calculator("23 * (4 + 5)"), calculator("7 / 2"), calculator("-3 + 1")) == ("207", "3.5", "-2")
    text, failed = call_tool({"calculator": calculator}, ToolCall("calculator", {"expression": "__import__('os')"}), 1.0)
    assert failed and "unsupported expression" in text
    row = {"prompt": "What is 3 + 4?", "answer": "7"}
    env = RetryArithmetic()
    assert "What is 3 + 4?" in env.reset(row)[0]["content"]
    wrong, right = env.step("It is 8."), env.step("The answer is 7.")
    assert (wrong.done, wrong.reward, right.done, right.reward) == (False, 0.0, True, 1.0) and wrong.observation
    calc = CalculatorArithmetic()
    calc.reset(row)
    assert calc.tools == [calculator] and calc.step("\\boxed{7}").reward == 1.0 and calc.step("6").reward == 0.0


def test_validation_without_reward_functions_is_a_clear_error():
    module = RLModule(GRPOLoss(), Policy(tokenizer_chars="0123456789", model_config={"hidden_size": 32}),
                      MultiTurnRollout(max_turns=1, n_samples_per_prompt=2))
    trainer = pl.Trainer(accelerator="cpu", strategy=LightRFTFake({"bf16": False}), logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    data = PromptDataModule(prompts=counting_prompts(4), val_prompts=counting_prompts(4), batch_size=2)
    with pytest.raises(ValueError, match="MultiTurnRollout has none; accepted: rollout rewards="):
        trainer.validate(module, data)


def test_return_estimators_skip_the_environments_tokens():
    """A multi-turn mask (model tokens, environment tokens, model tokens): returns and GAE on the model
    tokens equal those of the same tokens side by side (the environment's tokens are no time steps)."""
    from lightrft_lightning.algorithms.advantages import gae, returns_to_go, token_rewards

    gapped = torch.tensor([[0, 1, 1, 0, 0, 0, 1, 1, 1, 0]], dtype=torch.float32)
    packed = torch.tensor([[0, 1, 1, 1, 1, 1, 0, 0, 0, 0]], dtype=torch.float32)
    values = torch.arange(10, dtype=torch.float32)[None] / 10
    at = gapped[0].bool()
    on_packed = packed[0].bool()
    packed_values = torch.zeros_like(values)
    packed_values[0, on_packed] = values[0, at]
    for gamma in (1.0, 0.9):
        got = returns_to_go(token_rewards(torch.tensor([2.0]), gapped), gapped, gamma)
        ref = returns_to_go(token_rewards(torch.tensor([2.0]), packed), packed, gamma)
        assert torch.allclose(got[0, at], ref[0, on_packed]) and got[0, 1] != 0
        adv, ret = gae(token_rewards(torch.tensor([2.0]), gapped), values, gapped, gamma, 0.95)
        adv_ref, ret_ref = gae(token_rewards(torch.tensor([2.0]), packed), packed_values, packed, gamma, 0.95)
        assert torch.allclose(adv[0, at], adv_ref[0, on_packed]) and torch.allclose(ret[0, at], ret_ref[0, on_packed])


def test_multi_turn_grpo_with_lora_and_the_correction_resumes_exactly(tmp_path):
    """Sampled feedback episodes with LoRA adapters and TIS (the engine's log-probs): 4 straight steps against
    2 steps, a DCP checkpoint and 2 resumed ones (another seed: everything comes from the checkpoint); the
    logged metrics and every weight are equal, and the correction saw the engine's log-probs."""
    import sys

    from tests.launch import SCRIPTS

    sys.path.insert(0, str(SCRIPTS))
    from multiturn_grpo import CharChatRollout, Feedback

    from lightrft_lightning.callbacks import DCPCheckpoint

    def run(steps, dirpath, seed=0):
        pl.seed_everything(seed, verbose=False)
        rollout = CharChatRollout(Feedback, n_samples_per_prompt=2, temperature=1.0, max_new_tokens=4, max_turns=3,
                                  max_total_tokens=64)
        module = RLModule(GRPOLoss(rollout_is="token"),
                          Policy(model_config={"hidden_size": 64, "intermediate_size": 128}, lora={"r": 4}), rollout,
                          training=Training(micro_train_batch_size=4, actor_learning_rate=1e-2))
        steps_seen: list[dict[str, float]] = []

        class Keep(pl.Callback):
            def on_train_batch_end(self, trainer, *args) -> None:
                steps_seen.append({k: float(v) for k, v in trainer.callback_metrics.items()
                                   if not k.startswith(("time/", "perf/")) and not k.endswith("_s")})

        callback = DCPCheckpoint(dirpath, every_n_train_steps=2)
        trainer = pl.Trainer(accelerator="cpu", strategy=LightRFTFake({"bf16": False}), max_steps=steps, logger=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                             limit_val_batches=0, callbacks=[Keep(), callback])
        trainer.fit(module, PromptDataModule(prompts=counting_prompts(32, seed=3), batch_size=2, seed=1))
        return module, steps_seen, callback

    straight, metrics, _ = run(4, tmp_path / "a")
    run(2, tmp_path / "b")
    resumed, tail, callback = run(4, tmp_path / "b", seed=7)
    assert callback.resumed_from == "global_step2"
    assert all(s["episode/turns"] > 1 and "mismatch/logp_abs_diff" in s for s in metrics), metrics[0].keys()
    assert tail == metrics[2:] and all(s["loss/policy"] != 0 for s in metrics)
    names = [n for n, p in straight.actor.named_parameters() if p.requires_grad]
    assert names and all(".lora_" in n for n in names)
    for (name, a), b in zip(straight.actor.named_parameters(), resumed.actor.parameters()):
        assert torch.equal(a, b), name

"""`HFEngine`: the built-in rollout engine, a private copy of a transformers causal LM."""

from __future__ import annotations

import copy
import inspect
from typing import Any, Optional, Union

import torch
from torch import nn

from lightrft_lightning.engines.base import Completion, LifecycleEngine, SamplingParams

EosIds = Union[int, list[int], None]


class HFEngine(LifecycleEngine):
    """Batched generation with a KV cache and left padding from its own copy of a causal LM. Each
    prompt is prefilled once and its cache repeated for its ``n`` samples.

    ``sleep(1)`` moves the weights to CPU memory (nothing moves when the engine already runs on
    CPU), ``sleep(2)`` drops them: a complete :meth:`update_weights` is then needed before the next
    ``generate``. Completions include the EOS token that stopped them; log-probs are those of the
    distribution each token was sampled from (vLLM's ``processed_logprobs``): the logits divided by the
    temperature, as the learner scores them, and renormalized over what top-k / top-p keep (the
    learner does not filter: with those filters the two differ, by ``log`` of the mass kept).

    Args:
        model: a (non-sharded) transformers causal LM; the engine deep-copies it.
        pad_token_id: the id used for left padding.
        eos_token_id: the id (or ids) that end a completion (default: the model config's).
        sleep_level: what ``sleep()`` does by default: 1 keeps the weights in CPU memory, 2 drops them.
        device: where to generate (default: the model's device).
        share_weights: use ``model``'s parameter tensors instead of copies (same device and dtype only):
            no second copy of the weights, and a push of those same tensors copies nothing. A level-2
            sleep drops only the engine's references; the push after it fills fresh tensors as usual.
    """

    def __init__(self, model: nn.Module, *, pad_token_id: int, eos_token_id: EosIds = None, sleep_level: int = 1,
                 device: Any = None, share_weights: bool = False) -> None:
        super().__init__(sleep_level)
        if any(hasattr(p, "ds_id") or hasattr(p, "full_tensor") for p in model.parameters()):
            raise ValueError(
                "HFEngine(model): the model is sharded (FSDP2 DTensor or DeepSpeed ZeRO-3 parameters); build the engine "
                "with HFEngine.from_config(model.config, ...) and fill it with weight_sync.push_weights"
            )
        first = next(model.parameters(), None)
        self.device = torch.device(device) if device is not None else (first.device if first is not None else torch.device("cpu"))
        memo: dict[int, Any] = {}
        if share_weights:
            if any(p.device != self.device for p in model.parameters()):
                raise ValueError(f"HFEngine(share_weights=True): the model's weights are not all on {self.device}; "
                                 "accepted: share_weights=False (a copy) or device=None")
            # deepcopy takes these for the model's parameters: new Parameter objects over the same storage
            memo = {id(p): nn.Parameter(p.detach(), requires_grad=False) for p in model.parameters()}
        self.model = copy.deepcopy(model, memo).to(self.device).eval().requires_grad_(False)
        self.pad_token_id = int(pad_token_id)
        eos = eos_token_id if eos_token_id is not None else getattr(self.model.config, "eos_token_id", None)
        self.eos_token_ids: list[int] = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
        # every name a pushed tensor may carry (tied weights under each of their names) -> parameter
        self._params: dict[str, nn.Parameter] = dict(self.model.named_parameters(remove_duplicate=False))
        self._missing: set[int] = set()
        self._dropped: dict[int, torch.Size] = {}  # shapes of parameters a level-2 sleep emptied
        # transformers >= 5.x renamed past_key_values to cache
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    @classmethod
    def from_config(cls, hf_config: Any, *, dtype: Optional[torch.dtype] = None, **kwargs: Any) -> "HFEngine":
        """An engine with allocated but unset weights, to be filled by ``update_weights``: ``generate``
        refuses to run until every parameter was pushed. ``dtype`` defaults to the config's."""
        from transformers import AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        device = kwargs.get("device") or (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu")
        kwargs["device"] = device
        dtype = dtype or getattr(hf_config, "dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        with no_init_weights(), torch.device(device):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        model.tie_weights()  # skipped with the initialization: a tied lm_head would stay a separate tensor no push fills
        engine = cls(model, **kwargs)
        engine._missing = {id(p) for p in engine._params.values()}
        return engine

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def weights_valid(self) -> bool:
        return not self._missing

    def missing_weights(self) -> list[str]:
        """Names of the parameters that must still be pushed before ``generate`` may run."""
        return [name for name, p in self.model.named_parameters() if id(p) in self._missing]

    # ------------------------------------------------------------------ lifecycle hooks
    def _sleep(self, level: int) -> None:
        for param in self._unique_params():
            if level == 2:
                self._dropped[id(param)] = param.shape
                param.data = torch.empty(0, dtype=param.dtype, device=self.device)
                self._missing.add(id(param))
            elif self.device.type != "cpu":
                param.data = param.data.to("cpu")
        # buffers (e.g. rotary inv_freq) stay: they are small and nothing pushes them back
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _wake(self, tags: list[str]) -> None:
        if "weights" not in tags:
            return  # the KV cache is allocated per generate call
        for param in self._unique_params():
            if id(param) in self._dropped:
                param.data = torch.empty(self._dropped.pop(id(param)), dtype=param.dtype, device=self.device)
            elif param.device != self.device:
                param.data = param.data.to(self.device)

    def _load(self, named_tensors: list[tuple[str, torch.Tensor]], last_bucket: bool) -> None:
        with torch.no_grad():
            for name, tensor in named_tensors:
                param = self._params.get(name)
                if param is None:
                    raise ValueError(f"HFEngine.update_weights: unknown parameter {name!r}; "
                                     f"accepted: the model's names, e.g. {next(iter(self._params))!r}")
                if param.shape != tensor.shape:
                    raise ValueError(f"HFEngine.update_weights: {name!r} has shape {tuple(tensor.shape)}; "
                                     f"accepted: {tuple(param.shape)}")
                if param.data_ptr() != tensor.data_ptr():  # shared weights: already there
                    param.copy_(tensor)
                self._missing.discard(id(param))

    def _unique_params(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        from transformers import DynamicCache

        batch, width = len(prompts) * params.n, max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, row in enumerate(prompts):
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(self.device).manual_seed(params.seed)
        eos = torch.tensor(self.eos_token_ids if params.stop_at_eos else [], dtype=torch.long, device=self.device)
        cache = DynamicCache(config=self.model.config)
        logits = self._next_logits(ids, mask, positions, cache)
        if params.n > 1:  # the samples of a prompt continue from its one prefill
            cache.batch_repeat_interleave(params.n)
            logits, mask, positions = (t.repeat_interleave(params.n, dim=0) for t in (logits, mask, positions))
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        lengths = torch.full((batch,), params.max_new_tokens, dtype=torch.long, device=self.device)
        tokens, logprobs = [], []
        for step in range(params.max_new_tokens):
            if step:
                logits = self._next_logits(ids, mask, positions, cache)
            token, logp = _sample(logits, params, generator)
            logprobs.append(logp)
            tokens.append(token)
            stopped = ~finished & torch.isin(token, eos)
            lengths = torch.where(stopped, step + 1, lengths)
            finished |= stopped
            if bool(finished.all()):
                break
            ids = torch.where(finished, self.pad_token_id, token)[:, None]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            positions = positions[:, -1:] + 1
        token_ids, token_logprobs = torch.stack(tokens, 1).tolist(), torch.stack(logprobs, 1).tolist()
        stops, lengths = finished.tolist(), lengths.tolist()
        return [
            Completion(prompt_index=i // params.n, token_ids=token_ids[i][: lengths[i]],
                       logprobs=token_logprobs[i][: lengths[i]], finish_reason="eos" if stops[i] else "length")
            for i in range(batch)
        ]

    def _next_logits(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any) -> torch.Tensor:
        """The fp32 logits after the last position of ``ids``, extending ``cache``."""
        return self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                          **{self._cache_kw: cache}, logits_to_keep=1).logits[:, -1, :].float()


def _sample(logits: torch.Tensor, params: SamplingParams,
            generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of each row and its log-prob under the distribution it was sampled from (vLLM's
    ``processed_logprobs``): the logits / temperature, then top-k and top-p (renormalized over what they
    keep); greedy (temperature 0): the model's own distribution."""
    if params.temperature > 0:
        logits = sampling_logits(logits, params.temperature, params.top_k, params.top_p)
    logp = torch.log_softmax(logits, dim=-1)
    token = logits.argmax(-1) if params.temperature == 0 else torch.multinomial(logp.exp(), 1, generator=generator)[:, 0]
    return token, logp.gather(-1, token[:, None])[:, 0]


def sampling_logits(logits: torch.Tensor, temperature: float, top_k: int = -1, top_p: float = 1.0) -> torch.Tensor:
    """``logits / temperature`` with what top-k (``-1``: off) and top-p (``1.0``: off) filter out at -inf."""
    if temperature != 1:
        logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keeps the smallest prefix reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits

"""`GenerationConfig`, how to continue a prompt, apart from the decoder: the serving protocol builds one per
request and takes its field ranges from here, without importing torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from rugpt_ray.config import Config, option
from rugpt_ray.errors import UserError

MAX_LOGIT_BIAS = 100
"""OpenAI's bound on a `logit_bias` value (either sign)."""


class RequestError(UserError):
    """A request that could never run (the serving app answers 400); `param` names the offending field and
    `detail` says what is wrong with it."""

    def __init__(self, param: str | None, detail: str):
        super().__init__(f"{param}: {detail}" if param else detail)
        self.param, self.detail = param, detail


@dataclass
class GenerationConfig(Config):
    """How to continue a prompt."""

    where: ClassVar[str] = "generation"

    max_new_tokens: int = option(64, ge=0)
    """Tokens to generate at most per sequence (prompt + this must fit in the model's positions); 0 scores the
    prompt only (needs `prompt_logprobs`)."""
    min_new_tokens: int = option(0, ge=0)
    """Tokens to generate before EOS, `stop_token_ids` or stop strings may end a sequence."""
    greedy: bool = False
    """Always take the most likely token (temperature, top_k and top_p are then ignored)."""
    temperature: float = option(1.0, ge=0)
    """Divides the logits before sampling; 0 means greedy."""
    top_k: int = option(0, ge=0)
    """Sample among the k most likely tokens only; 0 = all."""
    top_p: float = option(1.0, gt=0, le=1)
    """Sample among the smallest set of tokens whose probability reaches top_p; 1 = all."""
    repetition_penalty: float = option(1.0, gt=0)
    """HF's CTRL-style penalty on tokens already in the prompt or output; 1 = none."""
    presence_penalty: float = option(0.0, ge=-2, le=2)
    """OpenAI's: subtracted once from the logit of every token already in the output."""
    frequency_penalty: float = option(0.0, ge=-2, le=2)
    """OpenAI's: subtracted from a token's logit once per time it is already in the output."""
    logit_bias: dict[int, float] = option(factory=dict)
    """OpenAI's: token id -> value added to its logit before everything else."""
    logprobs: int | None = option(None, ge=0)
    """Report each chosen token's log-probability (raw model log-softmax) and this many top alternatives."""
    prompt_logprobs: int | None = option(None, ge=0)
    """Report the same for every prompt token after the first (what the model predicted there)."""
    num_return_sequences: int = option(1, ge=1)
    """Continuations per prompt."""
    stop: list[str] = option(factory=list)
    """Strings that end a sequence; the output is cut before the first one."""
    stop_token_ids: list[int] = option(factory=list)
    """Token ids that end a sequence, besides EOS."""
    include_stop_str_in_output: bool = False
    """Keep the stop string or stop token that ended a sequence in its output."""
    ignore_eos: bool = False
    """Keep generating past EOS (it is then an ordinary token)."""
    seed: int | None = None
    """Seed for sampling; the same seed gives the same text."""

    def check(self) -> None:
        if not all(isinstance(k, int) and k >= 0 and -MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS
                   for k, v in self.logit_bias.items()):
            raise RequestError("logit_bias", f"must map token ids >= 0 to values in [-{MAX_LOGIT_BIAS}, "
                                             f"{MAX_LOGIT_BIAS}], "
                                             f"got {self.logit_bias!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise RequestError("stop", f"must be non-empty strings, got {self.stop!r}")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise RequestError("stop_token_ids", f"must be token ids >= 0, got {self.stop_token_ids!r}")
        if self.min_new_tokens > self.max_new_tokens:
            raise RequestError("min_new_tokens", f"{self.min_new_tokens} is over the most tokens to generate "
                                                 f"({self.max_new_tokens})")
        if self.max_new_tokens == 0 and self.prompt_logprobs is None:
            raise RequestError("max_new_tokens", "0 (score the prompt only) needs prompt_logprobs")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0

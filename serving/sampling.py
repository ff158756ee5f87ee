"""Sampling parameters and the sampler.

Sampling runs on the host over the last stage's logits, one request at a time with its own
`numpy.random.Generator`: a seeded request draws the same numbers whatever batch it shares,
and a request preempted and recomputed keeps its generator, so its tokens are reproducible.
Greedy batches skip the logits transfer: the argmax runs on the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipelive_jax.errors import RequestError

MAX_LOGPROBS = 20  # the most top tokens a request may ask log-probabilities for (as OpenAI)


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop (the names follow vLLM's SamplingParams).

    temperature 0 is greedy. top_k 0 or -1 disables top-k; top_p 1.0 disables nucleus sampling.
    `stop` strings end generation when they appear in the output text (the text is cut before
    them); `stop_token_ids` end it on those tokens (the token is kept in token_ids).
    `logprobs` (None: off) asks for each generated token's log-probability and the `logprobs`
    most likely tokens' (0: the generated token's only), under the model's own distribution
    (before penalties, temperature, top-k and top-p, as vLLM's default).
    Penalties change the logits before greedy or sampled picking, as vLLM's: `presence_penalty`
    is subtracted from every token already generated, `frequency_penalty` once per time it was
    generated (both in [-2, 2]); `repetition_penalty` (> 0, 1 is off) divides the positive logits
    and multiplies the negative ones of every token in the prompt or the output.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        def bad(name: str, why: str) -> RequestError:
            return RequestError(f"invalid sampling parameter {name}={getattr(self, name)!r}: {why}")

        if (
            not isinstance(self.max_tokens, int)
            or isinstance(self.max_tokens, bool)
            or self.max_tokens < 1
        ):
            raise bad("max_tokens", "must be an integer >= 1")
        if (
            not isinstance(self.temperature, int | float)
            or not np.isfinite(self.temperature)
            or self.temperature < 0
        ):
            raise bad("temperature", "must be a finite number >= 0")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            raise bad("top_k", "must be an integer; 0 or -1 disables it")
        if not isinstance(self.top_p, int | float) or not (0.0 < self.top_p <= 1.0):
            raise bad("top_p", "must be in (0, 1]")
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0
        ):
            raise bad("seed", "must be a non-negative integer or None")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be non-empty strings")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be non-negative integers")
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int)
            or isinstance(self.logprobs, bool)
            or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise bad("logprobs", f"must be None or an integer in 0-{MAX_LOGPROBS}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or isinstance(v, bool) or not -2.0 <= v <= 2.0:
                raise bad(name, "must be a number in [-2, 2]")
        rp = self.repetition_penalty
        if not isinstance(rp, int | float) or isinstance(rp, bool) or not 0 < rp < float("inf"):
            raise bad("repetition_penalty", "must be a finite number > 0 (1 is off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)

    @property
    def needs_logits(self) -> bool:
        """Whether picking this request's token needs the logits on the host (else the
        device's argmax does)."""
        return not self.greedy or self.penalized or self.logprobs is not None


def apply_penalties(
    logits: np.ndarray, prompt_ids: list[int], output_ids: list[int], params: SamplingParams
) -> np.ndarray:
    """Logits [vocab] with `params`' penalties applied (a float64 copy; see SamplingParams)."""
    x = logits.astype(np.float64)
    rp = params.repetition_penalty
    if rp != 1:
        seen = np.unique(np.asarray(prompt_ids + output_ids, dtype=np.int64))
        v = x[seen]
        x[seen] = np.where(v > 0, v / rp, v * rp)
    if output_ids and (params.presence_penalty or params.frequency_penalty):
        ids, counts = np.unique(np.asarray(output_ids, dtype=np.int64), return_counts=True)
        x[ids] -= params.frequency_penalty * counts + params.presence_penalty
    return x


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the most likely tokens' (most likely first)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprob(logits: np.ndarray, token: int, k: int) -> TokenLogprob:
    """Log-softmax of logits [vocab] (in float64) at `token`, and the `k` largest. Non-finite
    logits raise ValueError (an answer must not carry NaN)."""
    x = logits.astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("the logits are not finite")
    m = np.max(x)
    lp = x - (m + np.log(np.sum(np.exp(x - m))))
    k = min(k, x.shape[0])
    top: list[tuple[int, float]] = []
    if k > 0:
        idx = np.argpartition(-lp, k - 1)[:k]
        idx = idx[np.lexsort((idx, -lp[idx]))]  # most likely first; ties by id
        top = [(int(i), float(lp[i])) for i in idx]
    return TokenLogprob(int(token), float(lp[token]), top)


def sample_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token id from logits [vocab] (float32) under `params`."""
    if params.greedy:
        return int(np.argmax(logits))
    x = logits.astype(np.float64)
    if params.top_k > 0 and params.top_k < x.shape[0]:
        kth = np.partition(x, -params.top_k)[-params.top_k]
        x = np.where(x < kth, -np.inf, x)
    # The maximum is subtracted before the temperature divides: a tiny temperature (1e-310)
    # sends the other logits to -inf (probability 0) instead of all of them to inf (NaN).
    with np.errstate(over="ignore"):
        x = (x - np.max(x)) / params.temperature
    p = np.exp(x)
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        cut = int(np.searchsorted(cum, params.top_p)) + 1
        keep = np.zeros_like(p, dtype=bool)
        keep[order[:cut]] = True
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return int(rng.choice(p.shape[0], p=p))

"""Everything that crosses a socket, as msgspec Structs (msgpack on the wire).

Four directions:
- controller -> generator: `RolloutRequest`, `AbortRequests`, `UpdateWeights`,
  `SetAttentionWindow`, `Hello`, `Shutdown`;
- generator -> controller: `GeneratorReady`, `TokenChunk`, `RolloutFinished`
  (alone, or several of them in order as one `TokenBatch`), `RequestRejected`,
  `WeightsUpdated`, `AttentionWindowSet`, `WeightsUpdateFailed`;
- controller -> learner: `TrainBatch`, `SyncWeights`, `WeightsLoaded`,
  `SaveCheckpoint`, `Shutdown`;
- learner -> controller: `LearnerReady`, `StepDone`, `WeightsStaged`,
  `CheckpointSaved`, `LearnerFailed`.

Every generated token travels with its rollout log-prob and the policy
version that sampled it, so the learner can apply any off-policy correction.
Decoding is strict (`stream_rl/codec.py`): a malformed or foreign message
raises `ProtocolError` with the reason, which services log and skip.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import msgspec
from msgspec import Meta


class _Msg(msgspec.Struct, tag=True, forbid_unknown_fields=True, kw_only=True):
    # The job it belongs to (`run.id`), stamped by the sending channel: a
    # receiver of a job drops and counts any other (a stale role of an
    # earlier job on the same port, a stray or forged sender).
    run: str = ""


# --- controller -> generator ------------------------------------------------

class RolloutRequest(_Msg):
    request_id: str
    group_id: str
    prompt_ids: list[int]
    max_tokens: int
    # Tokens already generated for this rollout (a recycled partial): the
    # engine is fed prompt_ids + response_ids and continues token-in.
    response_ids: list[int] = []
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    # Evaluate the quality head when the response reaches this many tokens
    # (the pruner's L_detect); None: the rollout needs no score.
    score_at: int | None = None
    # Sampled log-probs of response_ids; needed when a continuation is still
    # to be scored (the head's confidence features cover tokens 1..score_at).
    response_logprobs: list[float] = []
    # Generate exactly max_tokens, past any end-of-sequence token: fixed-length
    # requests for throughput stress tests (vLLM's benchmarks do the same).
    ignore_eos: bool = False


class AbortRequests(_Msg):
    request_ids: list[str]


class UpdateWeights(_Msg):
    version: int
    # Backend-specific location of the staged weights (file path, shm name).
    uri: str


class SetAttentionWindow(_Msg):
    """Sparse rollouts (ALGORITHMS.md §6): every attention layer of the
    engine attends to the last `window` tokens only (0: dense). Running
    requests are recomputed under the new window, as after a weight load."""
    window: Annotated[int, Meta(ge=0)]


class Shutdown(_Msg):
    pass


class Hello(_Msg):
    """A controller (re)connecting: the generator answers `GeneratorReady`
    with the version it serves."""


# --- generator -> controller ------------------------------------------------

class GeneratorReady(_Msg):
    generator_id: str
    version: int
    max_model_len: int


class TokenChunk(_Msg):
    request_id: str
    # Index of token_ids[0] in the response (continuations start past the
    # partial), so the receiver can check nothing was lost or duplicated.
    offset: int
    token_ids: list[int]
    logprobs: list[float]  # log-prob of each sampled token (empty if not requested)
    versions: list[int]  # policy version that sampled each token
    score: QualityScore | None = None  # set on the chunk that follows the head's evaluation


class QualityScore(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The quality head's verdict on a rollout's first `at_tokens` response
    tokens, computed inside the engine from the hidden state that predicts
    token `at_tokens + 1`. `features` is the head's input (that hidden state
    and the confidence summary of the first `at_tokens` tokens, see
    `pruner.head.head_features`), float32 little-endian, kept so the learner
    can train the head on the rollout's final reward."""
    at_tokens: int
    logit: float
    features: bytes


class RolloutFinished(_Msg):
    request_id: str
    finish_reason: Literal["stop", "length", "abort"]
    num_tokens: int  # response tokens streamed by this request


class TokenBatch(_Msg):
    """Chunks and finishes a generator produced together (one engine
    step's outputs, or all that waited while its socket was busy), in the
    order they were produced: one message instead of one each, so a
    controller fed by many engines reads, polls and decodes per step, not
    per request (`generator/outbox.py`). Nested messages carry no run id of
    their own: the batch's is theirs."""
    messages: list[Union[TokenChunk, RolloutFinished]]


def batched(messages: list):
    """Chunks and finishes to send as one message: alone, or a TokenBatch of them in order."""
    return messages[0] if len(messages) == 1 else TokenBatch(messages=messages)


def unbatched(msg) -> list:
    """A message as the messages it carries: a TokenBatch's, in order; any other alone."""
    return msg.messages if isinstance(msg, TokenBatch) else [msg]


class RequestRejected(_Msg):
    request_id: str
    error: str


class WeightsUpdated(_Msg):
    version: int
    load_s: float  # from the request to serving the new version
    pause_s: float = 0.0  # of which generation was paused (loading the staged weights)


class AttentionWindowSet(_Msg):
    window: int  # the window it runs with now
    layers: int  # attention layers of the engine's workers that took it
    error: str = ""  # why the asked window was not set (the old one stays)


class WeightsUpdateFailed(_Msg):
    version: int
    error: str


# --- vLLM worker -> generator service (a side channel inside the generator) --

class WorkerScore(msgspec.Struct, forbid_unknown_fields=True, array_like=True):
    request_id: str
    score: QualityScore


class WorkerScores(_Msg):
    """The head's scores from one engine step."""
    scores: list[WorkerScore]


class WorkerLogprobs(_Msg):
    """The raw log-prob of every token one engine step sampled: the token at
    output position index[i] of the engine request the service knows as
    keys[i] (`generator/sampled_logprobs.py`)."""
    keys: list[str]
    index: list[int]
    logprobs: list[float]


# --- rollouts: what the buffer assembles and the learner trains on -------------

# How a rollout ended. "pruned": stopped by the pruner; it completes its group
# but is not trained on as a policy sample.
FINISH_REASONS = ("stop", "length", "pruned")


class Rollout(msgspec.Struct, kw_only=True):
    rollout_id: str
    group_id: str
    prompt_ids: list[int]
    answer: str
    max_tokens: int  # the whole budget; a continuation gets what is left of it
    response_ids: list[int] = []
    logprobs: list[float] | None = []  # rollout log-prob per token; None if not requested
    versions: list[int] = []  # policy version that sampled each token
    attempt: int = 0  # engine requests started for this rollout
    restarts: int = 0  # times its tokens were discarded as too stale
    finish_reason: str | None = None
    reward: float | None = None
    # The pruner's view (ARRoL): the quality head's logit and its input
    # features (float32 bytes) at L_detect tokens, the calibrated posterior
    # q, and the decision. keep_prob: the probability that it survived every
    # pruning draw it faced (its inclusion probability, for importance
    # correction; the product over restarts; 1.0 when no draw could remove
    # it). decision: None (not reached L_detect), "cold" (cold start),
    # "exempt" (the unpruned measurement slice), "kept", "spared" (its group
    # was at its minimum: no draw), "pruned", "unscored" (the score never
    # arrived).
    score: float | None = None
    features: bytes | None = None
    q: float | None = None
    keep_prob: float = 1.0
    decision: str | None = None
    # Probability its prompt survived prompt-level pruning (DPPO); 1.0 when
    # prompts are not pruned.
    prompt_inclusion: float = 1.0
    # The buffer session that started its latest request ("" unless restored
    # from a checkpoint): a resumed run's requests never share an id with
    # requests of the killed run that may still run in a surviving engine.
    session: str = ""

    @property
    def request_id(self) -> str:
        """The id of the current (latest) engine request for this rollout."""
        return f"{self.rollout_id}.{self.attempt}{self.session}"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def tokens_left(self) -> int:
        return self.max_tokens - len(self.response_ids)


class Group(msgspec.Struct, kw_only=True):
    group_id: str
    rollouts: list[Rollout]

    @property
    def survivors(self) -> list[Rollout]:
        """Members not pruned: the policy samples of this group."""
        return [r for r in self.rollouts if r.finish_reason != "pruned"]

    @property
    def rewards(self) -> list[float]:
        return [r.reward for r in self.survivors]

    @property
    def num_tokens(self) -> int:
        return sum(len(r.response_ids) for r in self.rollouts)


# --- controller -> learner ----------------------------------------------------

class Receivers(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The generators a staged version goes to. `epoch` changes whenever a
    generator is lost or rejoins: a transport that keeps a group of
    receivers (torch_dist) builds a new one then, and never waits on a
    transfer of an earlier epoch, whose peer may be dead."""
    epoch: int = 0
    generators: list[int]


class TrainBatch(_Msg):
    """One update's groups (complete, rewarded; the learner computes the
    advantages and trains the quality head on them too)."""
    step: int
    groups: list[Group]
    # The version the updated weights take when staged (None: no sync after
    # this step), whether the controller asks for them now
    # (weights_sync.every_steps; a learner may stage them anyway), and who
    # they go to (None: every configured generator).
    sync_version: int | None = None
    sync_due: bool = True
    receivers: Receivers | None = None


class SyncWeights(_Msg):
    """Stage the current weights as `version` without training (at start,
    and for a generator that rejoins while no other serves)."""
    version: int
    receivers: Receivers | None = None


class WeightsLoaded(_Msg):
    """Every generator serves `version` or a newer one that replaced it
    before it was loaded: its staged copy may go."""
    version: int


class SaveCheckpoint(_Msg):
    """Write the learner's state under `path` (a directory the controller
    completes with its own state)."""
    path: str
    step: int
    version: int


# --- learner -> controller ----------------------------------------------------

class LearnerReady(_Msg):
    ranks: int
    step: int  # updates done (a resumed learner's checkpoint step)
    # Its weights (or its quality head) are not what a generator started
    # from the model path serves: the controller syncs before generating.
    needs_sync: bool


class WeightsStaged(_Msg):
    version: int
    uri: str
    receivers: Receivers | None = None  # as asked: who may load it


class StepDone(_Msg):
    step: int
    stats: dict[str, Any]  # the update's and the head's metrics
    weights: WeightsStaged | None = None
    # Each trained group's mean |advantage| (0 for a group left out): DPPO's
    # prompt history (`data.DppoPromptSampler`), from the update itself.
    group_abs_advantage: dict[str, float] = {}


class CheckpointSaved(_Msg):
    path: str
    step: int


class LearnerFailed(_Msg):
    error: str


ToGenerator = Union[RolloutRequest, AbortRequests, UpdateWeights, SetAttentionWindow, Shutdown, Hello]
FromGenerator = Union[GeneratorReady, TokenChunk, RolloutFinished, TokenBatch, RequestRejected, WeightsUpdated,
                      AttentionWindowSet, WeightsUpdateFailed]
ToLearner = Union[TrainBatch, SyncWeights, WeightsLoaded, SaveCheckpoint, Shutdown]
FromLearner = Union[LearnerReady, WeightsStaged, StepDone, CheckpointSaved, LearnerFailed]
FromWorker = Union[WorkerScores, WorkerLogprobs]
Message = Union[ToGenerator, FromGenerator, ToLearner, FromLearner]

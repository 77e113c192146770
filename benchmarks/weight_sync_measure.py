"""What one weight sync costs while the generator keeps generating (`stream-rl bench weight-sync`).

The instruments of `benchmarks/weight_sync.py`, which runs them per backend
and reports: the benchmark's random-weight model (built once, cached) and the
weights a learner syncs from it; a thread that owns the generator's stream and
timestamps every token chunk on arrival; a fixed generation load kept in
flight; and one sync under that load (`sync_once`), timed from staging to the
generator's `WeightsUpdated`, with the tokens that arrived during it and
during its pause.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import queue
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

from stream_rl.protocol import (RequestRejected, RolloutFinished, RolloutRequest, TokenChunk, UpdateWeights,
                                WeightsUpdated, WeightsUpdateFailed)

CACHE_DIR = ".cache/bench-weight-sync-model"
CHUNK_TOKENS = 4


# --- the model -------------------------------------------------------------------

def build_bench_model(spec: dict, dtype: str, cache_dir: str | os.PathLike = CACHE_DIR) -> tuple[Path, dict]:
    """A random-weight Qwen3 checkpoint (and the tiny tokenizer) for `spec`
    in `dtype`, cached under `cache_dir/<hash of spec and dtype>`. Returns
    its directory and its description (parameters, bytes, ...)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from stream_rl.tiny.model import EOS, build_tokenizer

    key = dict(spec, dtype=dtype, builder=1)
    tag = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    out = Path(cache_dir) / tag
    info_path = out / "bench_model.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("key") == key:
            return out, dict(info, cached=True)
    t0 = time.time()
    tok = build_tokenizer()
    eos = tok.convert_tokens_to_ids(EOS)
    arch = {k: v for k, v in spec.items() if k != "seed"}
    config = Qwen3Config(vocab_size=len(tok), rope_theta=10000.0, bos_token_id=eos, eos_token_id=eos,
                         pad_token_id=eos, dtype=dtype, **arch)
    torch.manual_seed(spec.get("seed", 0))
    model = Qwen3ForCausalLM(config).to(getattr(torch, dtype))
    params = sum(p.numel() for p in model.parameters())  # a tied lm_head counts once
    sync = sync_state_dict(model)
    info = {
        "key": key, "params": params, "sync_tensors": len(sync),
        "sync_params": sum(t.numel() for t in sync.values()),
        "sync_bytes": sum(t.numel() * t.element_size() for t in sync.values()),
        "vocab_size": len(tok), "dtype": dtype, "build_s": round(time.time() - t0, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{tag}-"))
    os.chmod(tmp, 0o755)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "bench_model.json").write_text(json.dumps(info, indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)  # complete or absent
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, dict(info, cached=False)


def sync_state_dict(model) -> dict:
    """Checkpoint-format weights as the learner syncs them: the state dict's
    tensors (sharing the model's storage), a tied lm_head left out."""
    sd = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    return {k: v.detach() for k, v in sd.items()}


def perturb(weights: dict, seed: int, scale: float = 1e-4) -> None:
    """Nudge every tensor in place (the model sharing them moves too)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for t in weights.values():
        t.add_(torch.randn(t.shape, generator=g, dtype=t.dtype), alpha=scale)


# --- generation load and the stream ------------------------------------------------

class StreamReader(threading.Thread):
    """Owns the generator's stream: timestamps token chunks on arrival and
    hands request ends and weight-update replies to the main thread."""

    def __init__(self, gen):
        super().__init__(name="bench-stream", daemon=True)
        self.gen = gen
        self.times: list[float] = []  # chunk arrival times (sorted)
        self.counts: list[int] = []  # cumulative tokens up to and including that chunk
        self.ends: queue.Queue = queue.Queue()
        self.updates: queue.Queue = queue.Queue()
        self.watched: dict[str, list[TokenChunk]] = {}
        self._halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        total = 0
        try:
            while not self._halt.is_set():
                msg = self.gen.recv(100)
                t = time.perf_counter()
                if isinstance(msg, TokenChunk):
                    total += len(msg.token_ids)
                    self.counts.append(total)
                    self.times.append(t)
                    if msg.request_id in self.watched:
                        self.watched[msg.request_id].append(msg)
                elif isinstance(msg, (RolloutFinished, RequestRejected)):
                    self.ends.put(msg)
                elif isinstance(msg, (WeightsUpdated, WeightsUpdateFailed)):
                    self.updates.put((t, msg))
        except BaseException as err:
            self.error = err

    def tokens_between(self, a: float, b: float) -> int:
        n = len(self.times)  # a consistent prefix: the thread only appends
        times, counts = self.times[:n], self.counts[:n]
        i, j = bisect.bisect_left(times, a), bisect.bisect_left(times, b)
        return (counts[j - 1] if j else 0) - (counts[i - 1] if i else 0)

    def stop(self) -> None:
        self._halt.set()
        self.join(5.0)


class Load:
    """`concurrency` fixed-length requests in flight; `pump` replaces ended ones."""

    def __init__(self, gen, reader: StreamReader, prompt_ids: list[int], concurrency: int, max_tokens: int):
        self.gen, self.reader = gen, reader
        self.prompt_ids, self.n, self.max_tokens = prompt_ids, concurrency, max_tokens
        self.inflight: set[str] = set()
        self.ended: dict[str, object] = {}
        self.submitted = 0

    def pump(self) -> None:
        if self.reader.error is not None:
            raise RuntimeError(f"the stream reader failed: {self.reader.error!r}") from self.reader.error
        self.gen.check_alive()
        while True:
            try:
                msg = self.reader.ends.get_nowait()
            except queue.Empty:
                break
            if isinstance(msg, RequestRejected):
                raise RuntimeError(f"the generator rejected request {msg.request_id}: {msg.error}")
            self.inflight.discard(msg.request_id)
            self.ended[msg.request_id] = msg
        while len(self.inflight) < self.n:
            rid = f"load-{self.submitted}-{uuid.uuid4().hex[:6]}"
            self.submitted += 1
            self.gen.submit(RolloutRequest(request_id=rid, group_id="load", prompt_ids=self.prompt_ids,
                                           max_tokens=self.max_tokens, ignore_eos=True))
            self.inflight.add(rid)

    def run_for(self, seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            self.pump()
            time.sleep(0.01)

    def generate(self, prompt_ids: list[int], max_tokens: int, timeout_s: float = 600.0) -> list[TokenChunk]:
        """One greedy request beside the load; its chunks."""
        rid = f"check-{uuid.uuid4().hex[:8]}"
        self.reader.watched[rid] = []
        self.gen.submit(RolloutRequest(request_id=rid, group_id="check", prompt_ids=prompt_ids,
                                       max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        deadline = time.perf_counter() + timeout_s
        while rid not in self.ended:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"timed out waiting for the check request {rid}")
            self.pump()
            time.sleep(0.01)
        return self.reader.watched.pop(rid)


def sync_once(gen, load: Load, sender, weights: dict, version: int, timeout_s: float = 600.0) -> dict:
    """Stage `weights` as `version`, have the generator load them while the
    load goes on; the timings."""
    load.pump()
    t0 = time.perf_counter()
    uri = sender.stage(weights, version)
    t_staged = time.perf_counter()
    gen.requests.send(UpdateWeights(version=version, uri=uri))
    t_sent = None
    # torch_dist: when the sender's background broadcast ends (profiling only).
    thread = getattr(sender, "transfer_thread", None)
    last_pump = t_staged
    while True:
        try:
            t_reply, msg = load.reader.updates.get(timeout=0.005)
            break
        except queue.Empty:
            now = time.perf_counter()
            if thread is not None and t_sent is None and not thread.is_alive():
                t_sent = now
            if now - t0 > timeout_s:
                raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for weights version {version}")
            if now - last_pump > 0.05:  # replace ended requests: the load goes on during the sync
                load.pump()
                last_pump = now
    if thread is not None and t_sent is None:
        thread.join()
        t_sent = time.perf_counter()
    if isinstance(msg, WeightsUpdateFailed) or msg.version != version:
        raise RuntimeError(f"generator failed to load weights version {version}: "
                           f"{getattr(msg, 'error', msg)}")
    sender.release(version)
    t_end = time.perf_counter()
    gen.version = version
    pause_start = t_reply - msg.pause_s
    return {
        "version": version, "sync_s": t_end - t0, "stage_s": t_staged - t0,
        "transfer_s": (t_sent - t_staged) if thread is not None else None,
        "load_s": msg.load_s, "pause_s": msg.pause_s,
        "tokens_during_sync": load.reader.tokens_between(t0, t_reply),
        "tokens_during_pause": load.reader.tokens_between(pause_start, t_reply),
        "tokens_outside_pause": load.reader.tokens_between(t0, pause_start),
        "outside_pause_s": pause_start - t0,
    }

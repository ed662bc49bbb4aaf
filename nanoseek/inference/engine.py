"""The one generation engine: token ids in, token ids (and text) out, for every caller in nanoseek.

Requests are submitted (`submit`), then `step()` is called in a loop, by the caller or by a
background thread (`start()`). Each step:
1. drops cancelled requests (their cache row is freed at once);
2. admits waiting requests into free cache rows: the longest cached prefix of the prompt (from a
   running request or a finished one kept in the prefix store) is copied instead of recomputed,
   and only the rest of the prompt is prefilled (all of it for a request that wants its prompt
   logprobs, taken from the prefill's logits at every position; with max_new_tokens 0 the
   request ends there);
3. decodes one token for every running request together (continuous batching: rows join and
   leave between steps, each at its own length; a small MLA model with float weights in one call of
   nanoseek's C++ step, native.py), or, with MTP speculation, verifies the draft token of every row
   and keeps 1 or 2 tokens per row.
Running requests occupy cache rows 0..B-1 contiguously (a finishing row is filled by the last
one), so a decode step reads the cache without gathering.

Each request streams `Event`s (new token ids, their text with stop strings held back, logprobs)
into its own queue; `Request.result()` waits for the end.
A failure that belongs to one request (its grammar, its sampling, its stop strings, its prefill, its listener)
fails that request only (finish_reason "error", the exception in `Request.error`); only a failure
of the batch's own forward pass fails every request in the engine. The engine never sees chat templates
or HTTP; text only appears through the optional `decode` function (for stop strings).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import warnings
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..model import DeepseekForCausalLM
from ..model.moe import MoE
from ..quant import QuantLinear, prepare_kernels, weight_bytes
from .cache import KVCache, cache_dtype
from .native import NativeStep, hooked
from .sampling import InvalidRequest, RowState, SamplingParams, draw, processed_logits, sampled_logprobs

log = logging.getLogger("nanoseek")


# a model of this many bytes or more compiles without the C++ wrapper (_compile)
PYTHON_WRAPPER_MIN_BYTES = 256 * 2**20


class EngineBusy(RuntimeError):
    """The waiting queue is full; try again later (the server answers 503)."""


class ContextOverflow(InvalidRequest):
    """The prompt plus max_new_tokens does not fit the engine's context."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, context: int):
        self.prompt_tokens, self.max_new_tokens, self.context = prompt_tokens, max_new_tokens, context
        super().__init__(f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context "
                         f"of {context} tokens by {prompt_tokens + max_new_tokens - context}")


@dataclass
class Event:
    token_ids: list[int]
    text: str = ""  # new text, safe to show (never part of a stop string)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error" on the last event


@dataclass
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    tokens: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    prompt_logprobs: list[dict] = field(default_factory=list)  # with params.prompt_logprobs: prompt tokens 1..T-1
    text: str = ""  # the output text (stop string excluded), when the engine can decode
    finish_reason: str | None = None
    stop_string: str | None = None  # which of params.stop ended the text, if one did
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache instead of prefilled
    drafted: int = 0  # speculative tokens proposed / accepted
    accepted: int = 0
    steps: int = 0  # decode steps this request took part in
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue, repr=False)
    on_event: Callable[[Event], None] | None = field(default=None, repr=False)  # called from the engine thread
    cancelled: bool = False
    error: BaseException | None = None  # why it failed (finish_reason "error")
    _state: RowState | None = field(default=None, repr=False)
    _draft: int | None = field(default=None, repr=False)
    _draft_probs: torch.Tensor | None = field(default=None, repr=False)
    _prompt_raw: torch.Tensor | None = field(default=None, repr=False)  # logits after the prompt, while admitting
    _shown: int = 0  # characters of text already sent in events
    _reasoning_chars: int | None = None  # with params.stop_after: length of the text up to that token, once seen
    _constrained_at: int | None = None  # index in tokens where the grammar took over (stop strings end there)
    _constrained_chars: int | None = None  # length of the text before that token, once decoded
    _ids: list[int] = field(default_factory=list, repr=False)  # the tokens that make the text (stop tokens left out)
    _text: str = ""  # the text of _ids[:_read], settled: no character of it waits for a later token
    _window: int = 0  # _ids[_window:_read] is decoded again with each new token (see Engine._text)
    _read: int = 0
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def result(self, timeout: float | None = None) -> "Request":
        """Wait until the request has finished (when a background thread drives the engine)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} still running after {timeout}s")
        return self

    def stream(self, timeout: float | None = None) -> Iterator[Event]:
        """Events as they are decided, until the last one (needs the engine running in a thread)."""
        while True:
            ev = self.events.get(timeout=timeout)
            yield ev
            if ev.finish_reason is not None:
                return


class PrefixStore:
    """Finished sequences' latents, least recently used dropped first, bounded in tokens."""

    def __init__(self, max_tokens: int):
        self.max_tokens, self.tokens = max_tokens, 0
        self.entries: OrderedDict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def add(self, ids: Sequence[int], latents: torch.Tensor, lengths: torch.Tensor) -> None:
        key = tuple(ids)
        if not key or len(key) > self.max_tokens or key in self.entries:
            return
        self.entries[key] = (latents, lengths)
        self.tokens += len(key)
        while self.tokens > self.max_tokens:
            old, _ = self.entries.popitem(last=False)
            self.tokens -= len(old)

    def best(self, prompt: Sequence[int]) -> tuple[int, tuple[int, ...] | None]:
        best_n, best_key = 0, None
        for key in self.entries:
            n = common_prefix(key, prompt)
            if n > best_n:
                best_n, best_key = n, key
        if best_key is not None:
            self.entries.move_to_end(best_key)
        return best_n, best_key


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Engine:
    """Continuous-batching generation over one model. See the module docstring."""

    def __init__(self, model: DeepseekForCausalLM, decode: Callable[[list[int]], str] | None = None,
                 max_batch: int = 16, max_len: int | None = None, max_queue: int = 256,
                 speculative: bool = False, prefix_cache_tokens: int = 65536,
                 eos_token_id: int | Sequence[int] | None = None,
                 compile: bool = False, prefill_chunk: int = 512, kv_cache_dtype: str | torch.dtype = "auto",
                 native: bool = False):
        cfg = model.config
        if speculative and not model.mtp_layers:
            raise ValueError("speculative decoding needs a model with MTP layers (num_nextn_predict_layers > 0)")
        self.model, self.decode, self.config = model.eval(), decode, cfg
        self.max_len = min(max_len or 4096, cfg.max_position_embeddings)
        param = next(model.parameters())
        self.device = param.device
        self.cache = KVCache(cfg, rows=max_batch, max_len=self.max_len + 2,
                             dtype=cache_dtype(cfg, param.dtype, param.device, kv_cache_dtype), device=param.device)
        self.max_batch, self.max_queue, self.speculative = max_batch, max_queue, speculative
        self.prefill_chunk = prefill_chunk  # prompt tokens per prefill forward
        eos = cfg.eos_token_id if eos_token_id is None else eos_token_id  # one id or several (Llama 3: three)
        self.eos_ids = frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)
        self.active: list[Request] = []  # active[i] lives in cache row i
        self.waiting: deque[Request] = deque()
        self.prefixes = PrefixStore(prefix_cache_tokens)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.error: BaseException | None = None
        # compile=True: decode steps (and MTP drafts) run as compiled graphs, one call per step instead
        # of hundreds of small operations, which are most of a small model's step time on a CPU.
        # Prefill stays eager. Inside the graphs a small MoE reads its experts' weights stacked, a large
        # or quantized one calls its routed experts as one operator (MoE.prepare_compiled_decode); the first
        # steps of each shape take seconds to compile.
        self.compiled = compile
        if compile:  # quantized layers take their kernels' layouts now: a traced graph must not see them change
            prepare_kernels(model)
            # the cache's sizes are fixed for the engine's life: constants in its compiled steps rather than sizes
            # handed to every call (the shipped model, four pairs of alternating processes on a 2-vCPU Zen4: median
            # steps of 586-650 against 662-687 us at batch 1, 983-1,118 against 1,132-1,188 at 8; within the noise of
            # bench/release_decode.py's rounds); an engine with another cache shape compiles its own graphs
            torch._dynamo.mark_static(self.cache.kv)
            torch._dynamo.mark_static(self.cache._arange)
        # native=True (what serve, chat, generate, eval and GRPO's rollouts ask for): an MLA model with float weights
        # (a small one) or int8 ones decodes through nanoseek's C++ step (inference/native.py: the whole step in one
        # call, no graph), built here with the MoE layers' stacked experts and again whenever the weights change
        # (_check_weights)
        self._native_wanted = native and self.device.type == "cpu" and not cfg.is_gqa
        self.native: NativeStep | None = None
        self._moes = [m for m in model.modules() if isinstance(m, MoE)] if compile or self._native_wanted else []
        # the weights (see _check_weights): the parameters, and the quantized layers' scales (every requantization or
        # load writes them)
        self._params = list(model.parameters()) + [m.scales for m in model.modules() if isinstance(m, QuantLinear)]
        self._weights_key = None
        self._model_tag = _MODEL_TAGS.setdefault(model, f"model {next(_TAG_IDS)}")
        self._step_logits = self._compile(self._logits)
        self._step_draft = self._compile(self._draft_logits)
        self._step_greedy_spec = self._compile(self._greedy_speculation)
        if self._native_wanted:
            self._check_weights()

    def _compile(self, fn: Callable) -> Callable:
        """fn compiled (when the engine compiles); if compiling fails (no C++ compiler, say), a warning
        and the engine goes on eagerly.

        Compiled graphs are cached per function and shared by every engine in the process. Guards on
        the model's modules are skipped (they cost more than a small model's arithmetic), so the
        model is told apart by its tag instead (`_check_model`, read at the start of each compiled
        function): another model (another config) compiles its own graphs rather than reusing these."""
        if not self.compiled:
            return fn
        torch._dynamo.config.specialize_float = True  # the model's float attributes (scales, eps) are constants
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)  # graphs per model
        # no "duck sizing": sizes that happen to be equal at the first call (the cache's layers and the
        # attended length, say) would be assumed equal, and the graph compiled again when they part
        torch.fx.experimental._config.use_duck_shape = False
        # a small model's graph calls its kernels from C++ (no Python between them: the shipped model in int4 decoded
        # 1,400-1,430 tok/s with the C++ wrapper against 1,020-1,100 without, one run each); a large model's token is
        # long enough that the Python wrapper costs nothing, and the C++ one only adds compiling: DeepSeek-V2-Lite int4
        # on a 2-vCPU Zen4, the batch-1 graph in 42 against 103 s, the batch-8 one in 59 against 127 s, decoding as
        # fast (12.1-14.0 against 12.1-14.5 tok/s at batch 1, 18.0-18.6 against 17.4-17.6 at batch 8); R1-Distill-1.5B
        # in bf16 on a 2-vCPU Zen3, one C++ file of 38,600 lines for its 28 layers (the Python wrapper's kernels, alike
        # from layer to layer, are compiled once each) still compiling after 13 minutes, against 121 s for the batch-1
        # graph with the Python wrapper, which decoded 6.05 tok/s against eager's 5.32
        in_cpp = weight_bytes(self.model) < PYTHON_WRAPPER_MIN_BYTES
        compiled = torch.compile(fn, dynamic=True, fullgraph=True, options={
            "cpp_wrapper": in_cpp, "size_asserts": False,
            # the engine never swaps a model's modules or parameters, only their values change
            "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})

        def call(*args):
            if self.compiled:
                try:
                    return compiled(*args)
                except (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit) as e:
                    warnings.warn(f"torch.compile failed, decoding without it: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}", stacklevel=2)
                    self.compiled = False
            return fn(*args)

        return call

    # ---- requests ----
    def submit(self, prompt: Sequence[int], params: SamplingParams | None = None,
               on_event: Callable[[Event], None] | None = None) -> Request:
        """Queue a request; raises InvalidRequest (bad input) or EngineBusy (queue full) at once.
        on_event, if given, also receives every event (from the thread that runs the engine)."""
        params = params or SamplingParams()
        params.check(self.config.vocab_size)
        if params.stop and self.decode is None:
            raise InvalidRequest("stop strings need an engine built with a decode function")
        if isinstance(prompt, str):
            raise InvalidRequest("the prompt must be token ids, not text: encode it with the model's tokenizer first")
        prompt = prompt.tolist() if hasattr(prompt, "tolist") else list(prompt)  # (a tensor or an array of ids too)
        if prompt and isinstance(prompt[0], list):
            raise InvalidRequest("the prompt must be one sequence of token ids (a [T] tensor, not [B, T])")
        if not prompt:
            raise InvalidRequest("the prompt is empty")
        V = self.config.vocab_size
        bad = [t for t in prompt if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < V]
        if bad:
            raise InvalidRequest(f"prompt token ids must be integers in [0, {V}); got {bad[:5]}")
        if len(prompt) + params.max_new_tokens > self.max_len:
            raise ContextOverflow(len(prompt), params.max_new_tokens, self.max_len)
        with self._lock:
            if len(self.waiting) >= self.max_queue:
                raise EngineBusy(f"the engine queue is full ({self.max_queue} requests waiting)")
            req = Request(next(self._ids), prompt, params, on_event=on_event)
            self.waiting.append(req)
        self._wake.set()
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request; its cache row is freed at the start of the next step."""
        req.cancelled = True
        self._wake.set()

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
                 | None = None) -> list[Request]:
        """Run requests to completion in the calling thread (RL rollouts, evaluation, distillation)."""
        if self._thread is not None:
            raise RuntimeError("the engine is driven by its background thread; use submit() and result()")
        plist = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        pending = list(zip(prompts, plist))[::-1]
        reqs = []
        while pending or self.has_work:
            while pending and len(self.waiting) < self.max_queue:
                reqs.append(self.submit(*pending.pop()))
            self.step()
        return reqs

    @property
    def has_work(self) -> bool:
        return bool(self.active or self.waiting)

    def fitting(self, prompt_tokens: int, most: int) -> int:
        """A reply's default length: `most` tokens, or what the context leaves after the prompt (at least 1: a
        prompt that fills the context is refused by `submit`, in its terms)."""
        return max(1, min(most, self.max_len - prompt_tokens))

    # ---- background thread (the server) ----
    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="nanoseek-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        """Stop the background thread; requests still running or waiting end "cancelled"."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._drop_all("cancelled")

    def _loop(self) -> None:
        while not self._stop:
            if not self.has_work:
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            try:
                self.step()
                self.error = None  # (health: a step went through again)
            except BaseException as e:  # the batch itself failed: never leave clients hanging, keep serving
                log.error("an engine step failed; its requests end with an error", exc_info=e)
                self.error = e
                self._drop_all("error", e)

    def _drop_all(self, reason: str, error: BaseException | None = None) -> None:
        """End every running and waiting request with `reason` (and `error`), and free their cache rows."""
        with self._lock:
            reqs, self.active, self.waiting = list(self.active) + list(self.waiting), [], deque()
        self.cache.lengths.zero_()
        for req in reqs:
            req.error = req.error or error
            self._finish(req, reason)

    # ---- one scheduling iteration ----
    @torch.no_grad()
    def step(self) -> None:
        with self._lock:
            for req in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(req)
                self._finish(req, "error" if req.error else "cancelled")  # (error: its listener failed, see _emit)
        for i in reversed(range(len(self.active))):
            if self.active[i].cancelled:
                self._release(i, "error" if self.active[i].error else "cancelled")
        if self.waiting and len(self.active) < self.max_batch:
            self._check_weights()
        while len(self.active) < self.max_batch:
            with self._lock:
                if not self.waiting:
                    break
                req = self.waiting.popleft()
            try:
                self._prefill(req)
            except Exception as e:  # this request's own failure (its grammar, say): it alone fails
                self._fail(req, e)
        for r in self.active:  # identical prompts admitted together have shared them (see _reuse_prefix)
            r._prompt_raw = None
        if self.active:
            constrained = any(r.params.grammar is not None for r in self.active)  # constrained rows decode one token at a time
            self._decode_speculative() if self.speculative and not constrained else self._decode()

    def _check_weights(self) -> None:
        """Before admitting requests: if the model was trained since the last admission (GRPO trains
        it between rollouts), cached prefixes hold stale latents (dropped), the MoE layers prepare
        their compiled decoding again (stacked expert weights rebuilt) and the C++ step describes the model again.
        Parameters' versions count their in-place updates (and quantized layers' scales': requantized or loaded). A model with forward hooks (on any module, set since)
        decodes through its forward, which the C++ step would skip."""
        key = tuple((p.data_ptr(), p._version) for p in self._params)
        if key != self._weights_key:
            if self._weights_key is not None:
                self.prefixes = PrefixStore(self.prefixes.max_tokens)
            for m in self._moes:
                m.prepare_compiled_decode()
            self._weights_key, self.native = key, None
        if self._native_wanted:  # (forward hooks set or removed since: the step runs no module's forward)
            if any(hooked(m) for m in self.model.modules()):
                self.native = None
            elif self.native is None:
                self.native = NativeStep.build(self.model, self.cache)

    def _prefill(self, req: Request) -> None:
        row = len(self.active)
        self.active.append(req)
        req._state = RowState(req.params)
        if req.params.seed is not None:
            req._state.generator = torch.Generator(self.device).manual_seed(req.params.seed)
        if req.params.penalized:
            req._state.counts = torch.zeros(self.config.vocab_size, device=self.device)
        if req.params.grammar is not None:
            req._state.grammar = req.params.grammar.start()
        n, raw = self._reuse_prefix(req, row)
        req.cached_tokens = n
        rest = req.prompt[n:]
        if not rest:  # an identical prompt was just prefilled: its cache entries and its logits serve
            token = self._prompt_token(raw, req)
        for start in range(0, len(rest), self.prefill_chunk):  # chunks bound the activations of long prompts
            piece = rest[start:start + self.prefill_chunk]
            self.cache.select(row, row + 1)
            ids = torch.tensor([piece], device=self.device)
            hidden = self.model(ids, position_ids=self.cache.positions(len(piece)), cache=self.cache,
                                logits=False).hidden  # (1, S, D)
            self.cache.advance()
            last = start + len(piece) == len(rest)
            following = rest[start + 1:start + len(piece) + 1]  # the prompt tokens after this chunk's positions
            if req.params.prompt_logprobs and following:
                req.prompt_logprobs += _logprob_entries(self.model.lm_head(hidden[0, :len(following)]), following,
                                                        req.params.top_logprobs)
            if last:
                raw = self.model.lm_head(hidden[:, -1]).float()
                token = self._prompt_token(raw, req)
            if self.speculative:
                # MTP entries for these positions (each needs the token after it); the last one drafts token T+1
                nxt = following + ([token] if last else [])
                pos = self.cache.positions(len(piece), group=1)
                drafts = self._draft_logits(hidden, torch.tensor([nxt], device=self.device), pos,
                                            torch.tensor([len(piece) - 1]))
                if last:
                    self._set_drafts(drafts, [req])
                self.cache.advance(1)
        if req.params.max_new_tokens == 0:  # prefill only: the sampled token is dropped
            self._release(row, "length")
            return
        req._prompt_raw = raw
        self._append(row, [token], raw)

    def _reuse_prefix(self, req: Request, row: int) -> tuple[int, torch.Tensor | None]:
        """Copy the longest usable cached prefix into `row`; returns its length (0 = none) and, when
        it is the whole prompt, the logits that follow it. The whole prompt serves only from a row
        admitted in this same step with the very same prompt (a GRPO group, n completions of one
        request: each would otherwise prefill its last prompt token again, eagerly, for the same
        logits); otherwise at least the last prompt token is prefilled, for the first logits."""
        T, spec = len(req.prompt), self.speculative
        if req.params.prompt_logprobs:  # they need the logits of every position
            self.cache.reset(row)
            return 0, None
        twin = next((i for i, o in enumerate(self.active[:-1]) if o._prompt_raw is not None and o.prompt == req.prompt),
                    None)
        if twin is not None and not spec:  # (speculative rows also need the MTP entries of the last position)
            self.cache.write(row, self.cache.entries(twin, T), T)
            return T, self.active[twin]._prompt_raw
        best, source = 0, None
        for i, other in enumerate(self.active[:-1]):
            seq = other.prompt + other.tokens
            limit = min(int(self.cache.lengths[0, i]), common_prefix(seq, req.prompt))
            if spec:
                limit = min(limit - 1, int(self.cache.lengths[1, i]))
            if limit > best:
                best, source = limit, ("row", i)
        n, key = self.prefixes.best(req.prompt)
        if key is not None:
            latents, lengths = self.prefixes.entries[key]
            limit = min(n, int(lengths[0])) if not spec else min(n - 1, int(lengths[0]), int(lengths[1]))
            if limit > best:
                best, source = limit, ("store", latents)
        best = min(best, T - 1)  # at least one prompt token is prefilled, for the first logits
        if best <= 0:
            self.cache.reset(row)
            return 0, None
        latents = self.cache.entries(source[1], best) if source[0] == "row" else source[1]
        self.cache.write(row, latents, best)
        return best, None

    def _logits(self, ids: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The selected rows' next tokens ids [B, S] at positions pos -> final hidden states [B, S, D]
        and logits [B, S, V] (fp32). Compiled for decoding when the engine is built with compile=True. The
        new latents stay staged in the cache; the caller's `cache.advance` writes them, outside the graph."""
        self._check_model()
        hidden = self.model(ids, position_ids=pos, cache=self.cache, logits=False).hidden
        return hidden, self.model.lm_head(hidden).float()

    def _draft_logits(self, hidden: torch.Tensor, next_ids: torch.Tensor, pos: torch.Tensor,
                      take: torch.Tensor) -> torch.Tensor:
        """MTP depth 1 over hidden [B, S, D] with next_ids [B, S] at MTP positions pos; -> the draft
        logits [B, V] (fp32) of row i from its position take[i]."""
        self._check_model()
        mtp = self.model.mtp_layers[0]
        cos, sin = self.model.model.rotary_emb(pos)
        h = mtp.predict(hidden, next_ids, cos, sin, self.cache)
        h = h[torch.arange(h.shape[0], device=h.device), take]  # (B, D)
        return mtp.shared_head(h).float()

    def _check_model(self) -> None:
        """Compiled, this puts a guard on the model's tag (see _compile)."""
        if not self._model_tag:
            raise RuntimeError("engine without a model tag")

    def _greedy_speculation(self, ids: torch.Tensor, pos: torch.Tensor, mtp_pos: torch.Tensor):
        """A whole greedy speculative step as one function (one compiled graph): verify the drafts
        ids[:, 1] after ids[:, 0], then draft the next token with MTP from the verified part.
        -> logits [B, 2, V], the main model's picks [B, 2], draft accepted [B] (bool), next drafts [B]."""
        hidden, raw = self._logits(ids, pos)
        best = raw.argmax(dim=-1)  # (B, 2): the token after ids[:, 0] (= the draft if it stood), and after the draft
        ok = best[:, 0] == ids[:, 1]
        nxt = torch.stack([best[:, 0], torch.where(ok, best[:, 1], best[:, 0])], dim=1)
        return raw, best, ok, self._draft_logits(hidden, nxt, mtp_pos, ok.long()).argmax(dim=-1)

    def _decode(self) -> None:
        B = len(self.active)
        if self.native is not None and not hooked(self.model):  # the whole step in C++, the cache's writes and lengths included
            raw, best = self.native([r.tokens[-1] for r in self.active])  # (B, V), (B,)
            tokens = self._sample(raw, self.active, best)
        else:
            last = torch.tensor([[r.tokens[-1]] for r in self.active], device=self.device)
            self.cache.select(0, B)
            pos = self.cache.positions(1)
            raw = self._step_logits(last, pos)[1][:, -1]  # (B, V)
            self.cache.advance()
            tokens = self._sample(raw, self.active)
        for i, t in reversed(list(enumerate(tokens))):
            self.active[i].steps += 1
            self._append(i, [t], raw[i:i + 1])

    def _decode_speculative(self) -> None:
        """Verify each row's MTP draft: feed [last, draft]; keep the draft if the main model agrees
        (greedy) or by the accept/reject rule (sampling), plus one token from the main model."""
        B, rows = len(self.active), self.active
        inp = torch.tensor([[r.tokens[-1], r._draft] for r in rows], device=self.device)  # (B, 2)
        self.cache.select(0, B)
        pos = self.cache.positions(2)
        if _plain_greedy(rows):
            raw, best, ok, drafts = self._step_greedy_spec(inp, pos, self.cache.positions(2, group=1))
            accepted = ok.long()
            self.cache.advance(0, accepted + 1)
            self.cache.advance(1, accepted + 1)
            best, ok = best.tolist(), ok.tolist()
            new = [b if ok[i] else b[:1] for i, b in enumerate(best)]
            for r, d in zip(rows, drafts.tolist()):
                r._draft = d
            self._after_speculation(rows, new, ok, raw)
            return
        hidden, raw = self._step_logits(inp, pos)  # (B, 2, D), (B, 2, V)
        p0 = processed_logits(raw[:, 0], [r._state for r in rows])
        ok = []
        for i, r in enumerate(rows):
            if r.params.temperature == 0:
                ok.append(bool(p0[i].argmax() == r._draft))
            else:
                p, q = p0[i].softmax(-1)[r._draft], r._draft_probs[r._draft]
                u = torch.rand((), generator=r._state.generator, device=self.device)
                ok.append(bool(u * q <= p))
        accepted = torch.tensor(ok, device=self.device, dtype=torch.long)
        self.cache.advance(0, accepted + 1)
        # the token after the verified part: from position 1 if the draft stood, else a correction at 0
        second = self._sample(raw[:, 1], rows)
        firsts = [self._first_token(r, p0[i], ok[i]) for i, r in enumerate(rows)]
        # a row whose sampling failed gets [None]: _append fails it alone
        new = [[None] if f is None or s is None else [f, s] if ok[i] else [f]
               for i, (f, s) in enumerate(zip(firsts, second))]
        # MTP: entries at the verified positions (h_last with the first new token, h_draft with the second)
        nxt = torch.tensor([[t or 0 for t in (n * 2)[:2]] for n in new], device=self.device)
        self._set_drafts(self._step_draft(hidden, nxt, self.cache.positions(2, group=1), accepted), rows)
        self.cache.advance(1, accepted + 1)
        self._after_speculation(rows, new, ok, raw)

    def _first_token(self, r: Request, p0: torch.Tensor, ok: bool) -> int | None:
        """A verified row's first new token: its draft if it stood, else the main model's correction
        from its processed logits p0 [V]; None if that fails (the row then fails alone)."""
        if ok:
            return r._draft
        try:
            if r.params.temperature == 0:
                return int(p0.argmax())
            resid = (p0.softmax(-1) - r._draft_probs).clamp(min=0)
            return int(torch.multinomial(resid / resid.sum(), 1, generator=r._state.generator))
        except Exception as e:
            r.error = e
            return None

    def _after_speculation(self, rows: list[Request], new: list[list[int]], ok: list[bool], raw: torch.Tensor) -> None:
        for i in reversed(range(len(rows))):
            r = rows[i]
            r.steps += 1
            r.drafted += 1
            r.accepted += int(ok[i])
            self._append(i, new[i], raw[i, : len(new[i])])

    def _set_drafts(self, raw: torch.Tensor, rows: list[Request]) -> None:
        """Each row's next draft token (and, when sampling, the distribution it was drawn from) from
        the MTP logits raw [B, V]."""
        if _plain_greedy(rows):
            for r, t in zip(rows, raw.argmax(dim=-1).tolist()):
                r._draft, r._draft_probs = t, None
            return
        logits = processed_logits(raw, [r._state for r in rows])
        for i, r in enumerate(rows):
            if r.params.temperature == 0:
                r._draft, r._draft_probs = int(logits[i].argmax()), None
            else:
                probs = logits[i].softmax(-1)
                r._draft = int(torch.multinomial(probs, 1, generator=r._state.generator))
                r._draft_probs = probs

    def _sample(self, raw: torch.Tensor, rows: list[Request], best: torch.Tensor | None = None) -> list[int | None]:
        """One token per row from the raw logits [B, V]. If sampling the batch raises (a row's grammar,
        say), each row is sampled alone; a row that raises alone gets None, its error in req.error (_append
        fails it, and it alone: a batch of one row fails its request, never the engine's step). best [B], the
        argmax the C++ step returns with its logits, serves rows that all decode plainly greedily (an argmax
        here after the step took ~25 us, a tenth of the shipped model's step)."""
        if best is not None and _plain_greedy(rows):
            return best.tolist()
        if len(rows) > 1:
            try:
                return self._sample_rows(raw, rows)
            except Exception:
                pass
        return [self._sample_alone(raw[i:i + 1], r) for i, r in enumerate(rows)]

    def _prompt_token(self, raw: torch.Tensor, req: Request) -> int:
        """The token after a prompt, from its logits [1, V]; raises what sampling raised (_prefill's caller
        fails the request)."""
        token = self._sample_alone(raw, req)
        if token is None:
            raise req.error
        return token

    def _sample_alone(self, raw: torch.Tensor, req: Request) -> int | None:
        try:
            return self._sample_rows(raw, [req])[0]
        except Exception as e:
            req.error = e
            return None

    def _sample_rows(self, raw: torch.Tensor, rows: list[Request]) -> list[int]:
        if _plain_greedy(rows):
            return raw.argmax(dim=-1).tolist()
        states = [r._state for r in rows]
        logits = processed_logits(raw, states)
        tokens = draw(logits, states).tolist()
        for i, r in enumerate(rows):  # a constrained reply about to run out of budget is completed instead
            if r._state.grammar is not None:
                tokens[i] = r._state.grammar.closing(r.params.max_new_tokens - len(r.tokens), tokens[i])
        return tokens

    # ---- bookkeeping ----
    def _append(self, row: int, tokens: list[int | None], logits: torch.Tensor) -> None:
        """Add sampled tokens (drawn from the raw logits [n, V]) to the request in `row`, emit an
        event, and finish the request if a stop rule fires; a token None (its sampling failed), or
        a failure here, fails the request."""
        req = self.active[row]
        try:
            if None in tokens:
                raise req.error or RuntimeError("sampling failed")
            self._add_tokens(row, req, tokens, logits)
        except Exception as e:
            self._fail(req, e)

    def _fail(self, req: Request, e: BaseException) -> None:
        """End one request with "error" (freeing its cache row if it has one)."""
        req.error = e
        row = next((i for i, r in enumerate(self.active) if r is req), None)
        if row is not None:
            self._release(row, "error")
        else:
            self._finish(req, "error")

    def _add_tokens(self, row: int, req: Request, tokens: list[int], logits: torch.Tensor) -> None:
        p = req.params
        stops = self._stop_ids(req)
        new, reason = [], None
        for t in tokens:
            new.append(t)
            req.tokens.append(t)
            if req._state.counts is not None:
                req._state.counts[t] += 1
            if (g := req._state.grammar) is not None:
                g.consume(t)
                if g.active and req._constrained_at is None:
                    req._constrained_at = len(req.tokens) - 1
            if t in stops or (g is not None and g.finished):
                reason = "length" if g is not None and g.cut_short else "stop"  # closed early: the budget ended it
            elif len(req.tokens) >= p.max_new_tokens:
                reason = "length"
            if reason:
                break
        lp = _logprob_entries(logits[: len(new)], new, p.top_logprobs) if p.logprobs else []
        req.logprobs.extend(lp)
        text = ""
        if self.decode is not None:
            full = self._text(req, [t for t in new if t not in stops and t not in p.skip_token_ids])
            start = self._stops_from(req, full, req._ids) if p.stop else None
            end = self._stops_until(req) if p.stop else None
            found = None if start is None else _find_stop(full[start:end], p.stop)
            if found is not None:
                full, reason, req.stop_string = full[:start + found[0]], "stop", found[1]
            req.text = full
            hold = 0 if reason or end is not None else max((len(s) - 1 for s in p.stop), default=0)
            safe = len(full) - hold
            while not reason and safe > req._shown and full[safe - 1] == "\ufffd":  # an incomplete UTF-8
                safe -= 1  # character may complete with the next token; at the end it is sent as it decodes
            if safe > req._shown:
                text, req._shown = full[req._shown:safe], safe
        self._emit(req, Event(new, text, lp, reason))
        if reason:
            self._release(row, reason, emitted=True)

    def _text(self, req: Request, new: list[int]) -> str:
        """The reply's text with `new` tokens added, decoding only the tokens since the last settled
        character (decoding the whole reply at each token cost 0.24 ms a token by 1,500 tokens, 10% of a
        small model's decode): the text of _ids[_window:] minus that of _ids[_window:_read], so a
        decoder that treats a sequence's first token apart (a leading space) gives the same text as the
        whole. A tail that ends inside a character stays unsettled and is decoded again next time."""
        req._ids += new
        before = self.decode(req._ids[req._window:req._read])
        now = self.decode(req._ids[req._window:])
        if not now.startswith(before):  # not a prefix (no known decoder does this): decode the whole
            req._text, req._window, req._read = self.decode(req._ids), len(req._ids), len(req._ids)
            return req._text
        tail = now[len(before):]
        if tail.endswith("\ufffd"):
            return req._text + tail
        req._text += tail
        req._window, req._read = req._read, len(req._ids)
        return req._text

    def _stops_from(self, req: Request, text: str, ids: list[int]) -> int | None:
        """Where stop strings start to count in `text` (the decoded `ids`): 0, or with stop_after (the
        end of the reasoning) past that token and the whitespace after it; None while it is not there.
        The reasoning's length is decoded once, when the token appears."""
        after = req.params.stop_after
        if after is None:
            return 0
        if req._reasoning_chars is None:
            if after not in ids:
                return None
            req._reasoning_chars = len(self.decode(ids[: ids.index(after) + 1]))
        return len(text) - len(text[req._reasoning_chars:].lstrip())

    def _stops_until(self, req: Request) -> int | None:
        """Where stop strings stop counting in the text: where the grammar took over (a JSON answer or a
        block of tool calls must parse whole; a stop string inside it would break it), else None."""
        if req._constrained_at is not None and req._constrained_chars is None:
            stops = self._stop_ids(req)
            skip = stops | req.params.skip_token_ids
            req._constrained_chars = len(self.decode([t for t in req.tokens[:req._constrained_at] if t not in skip]))
        return req._constrained_chars

    def _stop_ids(self, req: Request) -> set[int]:
        return set(req.params.stop_token_ids) | (set() if req.params.ignore_eos else self.eos_ids)

    def _release(self, row: int, reason: str, emitted: bool = False) -> None:
        req = self.active[row]
        n = int(self.cache.lengths[0, row])
        if n > 0 and reason in ("stop", "length"):  # a cancelled or failed request's latents are not kept
            seq = (req.prompt + req.tokens)[:n]
            self.prefixes.add(seq, self.cache.read(row, n), self.cache.lengths[:, row].clone())
        last = len(self.active) - 1
        if row != last:
            self.cache.move(last, row)
            self.active[row] = self.active[last]
        else:
            self.cache.reset(row)
        self.active.pop()
        self._finish(req, reason, emitted)

    def _finish(self, req: Request, reason: str, emitted: bool = False) -> None:
        if req.finish_reason is None:
            req.finish_reason = reason
            if not emitted:
                self._emit(req, Event([], "", [], reason))
        req._done.set()

    @staticmethod
    def _emit(req: Request, ev: Event) -> None:
        req.events.put(ev)
        if req.on_event is not None:
            try:
                req.on_event(ev)
            except Exception as e:  # its listener failed (or is gone: a closed event loop): the request stops with it
                req.error = req.error or e
                req.cancelled = True


_MODEL_TAGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> the tag its compiled graphs check
_TAG_IDS = itertools.count()


def _plain_greedy(rows: list[Request]) -> bool:
    """Greedy rows without penalties, biases or grammars: no logit processing changes their argmax."""
    return all(r.params.temperature == 0 and not r.params.penalized and not r.params.logit_bias
               and r._state.grammar is None for r in rows)


def _logprob_entries(raw: torch.Tensor, tokens: list[int], k: int) -> list[dict]:
    """{"token", "logprob", "top": [(id, logprob)] * k} for each token, from the raw logits [n, V] it followed."""
    chosen, top = sampled_logprobs(raw, torch.tensor(tokens, device=raw.device), k)
    return [{"token": t, "logprob": c, "top": a} for t, c, a in zip(tokens, chosen, top)]


def _find_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """Where the first of the stop strings in text starts, and which it is (of two starting there, the first listed)."""
    hits = [(i, s) for i, s in ((text.find(s), s) for s in stops) if i >= 0]
    return min(hits, key=lambda hit: hit[0]) if hits else None


def generate(model: DeepseekForCausalLM, prompts: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             eos_token_id: int | None = None, seed: int | None = None) -> list[list[int]]:
    """Convenience: a [B, T] tensor of prompts -> the generated ids of each (lists, up to max_new_tokens)."""
    engine = Engine(model, max_batch=max(1, len(prompts)), max_len=prompts.shape[1] + max_new_tokens,
                    eos_token_id=eos_token_id if eos_token_id is not None else -1)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    return [r.tokens for r in engine.generate(prompts.tolist(), params)]

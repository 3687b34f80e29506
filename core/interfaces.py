"""The objects that the backend hooks exchange with the core.

`hookspecs.py` is the contract; this module holds the types it names. A backend returns these from its
hooks once, when the engine is built, and the engine's step loop then calls the returned objects
directly (a pluggy call costs ~20x a plain call, so no hook is called per layer or per token).
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------------


class BackendStatus(str, enum.Enum):
    """Why a backend can or cannot run here; `tokenmill env` prints the value."""

    USABLE = "usable"
    LIBRARY_MISSING = "vendor library missing"
    NO_DEVICE = "no device"
    INCOMPLETE = "incomplete"  # hardware found, but the plugin lacks a hook the engine needs
    ERROR = "discovery failed"
    REFUSED = "refused at load"


@dataclass(frozen=True)
class DeviceInfo:
    """One device a backend can run on."""

    index: int
    name: str
    total_memory_bytes: int
    free_memory_bytes: int | None = None
    properties: Mapping[str, str] = field(default_factory=dict)  # ISA flags, compute capability...


@dataclass(frozen=True)
class Discovery:
    """A backend's answer to "can you run here?", cheap to compute and never raising."""

    status: BackendStatus
    reason: str  # one sentence a user can act on
    priority: int  # the highest-priority usable backend is chosen
    devices: tuple[DeviceInfo, ...] = ()
    versions: Mapping[str, str] = field(default_factory=dict)  # torch, vendor libraries, drivers
    install_extra: str | None = None  # the `tokenmill[...]` extra that installs the vendor library

    @property
    def is_usable(self) -> bool:
        return self.status is BackendStatus.USABLE


# --------------------------------------------------------------------------------------------------
# Device
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DevicePlatform:
    """What the engine needs to know about the device it was given, after the backend set it up."""

    device: torch.device
    supported_dtypes: tuple[torch.dtype, ...]
    preferred_dtype: torch.dtype  # what `--dtype auto` becomes
    description: str = ""  # e.g. "2 threads, AVX512-BF16"
    # Where the sampler runs; None: on `device`. A backend that compiles per shape names the host: the
    # sampler's shapes follow the batch and its settings, so on the device every new mix would compile.
    sampling_device: torch.device | None = None
    # The backend's own count of graph compilations so far (XLA's CompileTime metric), which
    # `tokenmill_compiles_total` reports; None: the core counts distinct padded step shapes instead.
    compile_count: Callable[[], int] | None = None
    # Steps run under torch.inference_mode(); False: under torch.no_grad(), for devices whose tensors
    # cannot be inference tensors (torch-xla's functionalization sets their version counters).
    inference_mode: bool = True


# --------------------------------------------------------------------------------------------------
# KV cache and attention
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KVCacheShape:
    """What a model needs cached per token, per layer."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype  # the model's: keys and values arrive in it, attention returns it
    # What the cache stores them as (`--kv-cache-dtype`, see tokenmill.kv_cache_dtype): "auto" is `dtype`.
    cache_dtype: str = "auto"


class KVCacheLayout(abc.ABC):
    """A backend's paged KV-cache geometry on its device: block size, memory, allocation and copies.

    The core only deals in block ids; what a block looks like in memory is the backend's business.

    Quantized caches: `cache_dtypes` names the `KVCacheShape.cache_dtype` values the layout (and its
    attention backend) can store; the core refuses a start asking for another, naming these. A layout
    storing a one-byte format says in `kv_scales` how it keeps the scales (`tokenmill.kv_cache_dtype`:
    "token_head", one scale per written row of a token's kv head), which the conformance suite's
    reference rounding follows. `bytes_per_block` counts codes and scales together.
    """

    block_size: int  # tokens per block
    cache_dtypes: tuple[str, ...] = ("auto",)
    kv_scales: str | None = None

    @abc.abstractmethod
    def bytes_per_block(self) -> int:
        """Bytes one block takes over all layers, keys and values together."""

    @abc.abstractmethod
    def allocate(self, num_blocks: int) -> list[torch.Tensor]:
        """One cache tensor per layer, each holding `num_blocks` blocks of keys and values."""

    @abc.abstractmethod
    def copy_blocks(self, caches: Sequence[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy block `src[i]` onto block `dst[i]` in every layer (copy-on-write, preemption swap)."""

    def resident_block_limit(self, num_blocks: int) -> int | None:
        """How many blocks may hold freed prefixes before those are reused instead of fresh blocks.

        None (the default) suits memory committed at allocation (device memory): every block is paid
        for, so freed prefixes stay cached until the whole pool is in use. A layout whose memory is
        committed on first write returns a bound: its resident memory is then the larger of the
        working set and that many blocks.
        """
        return None


@dataclass(frozen=True)
class AttentionSpec:
    """One attention layer's shape; layers that differ (sliding window) get their own backend object."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    dtype: torch.dtype
    sliding_window: int | None = None  # a query sees at most this many most recent keys, itself included
    logit_softcap: float | None = None  # Gemma 2: scores = softcap * tanh(scores / softcap)


@dataclass
class AttentionMetadata:
    """The flattened batch as attention sees it, built once per step and shared by every layer.

    Tokens of all sequences are concatenated without padding. Sequence `i` owns query tokens
    `query_start_loc[i]:query_start_loc[i+1]`, which are the *last* tokens of its `seq_lens[i]`-token
    context; every earlier token of that context is already in the cache at the blocks
    `block_tables[i]`. A decode is a sequence with one query token; a prefill chunk has several.

    Padding. A backend with `ShapeBuckets` (and a graph replay) gets steps padded to a static shape, with
    rows that belong to no request, always after the real ones:

    * a ``slot_mapping`` of -1 means "do not write": such a token's key and value must not reach the
      cache. Padding tokens are the rows from ``query_start_loc[-1]`` on (token id 0, position 0, slot
      -1); their attention output may be anything, nothing reads it;
    * padding sequences have query length 0 (``query_start_loc`` repeats its last value), seq_len 0 and
      a block table of zeros: they attend to nothing and produce nothing;
    * the host ints are then bounds fixed by the shape, not the step's exact values: ``max_query_len``
      is 1 for a decode step, else the number of tokens; ``block_tables`` is as wide as the step's width
      bucket (`ShapeBuckets.blocks_per_seq`; without one, as wide as the model's context needs) and
      ``max_seq_len`` is that width in tokens, at most the model's context length
      (`tokenmill.model_runner.StepPadding`).
    """

    query_start_loc: torch.Tensor  # (num_seqs + 1,) int32, cumulative query lengths
    seq_lens: torch.Tensor  # (num_seqs,) int32, context length including this step's tokens
    block_tables: torch.Tensor  # (num_seqs, max_blocks_per_seq) int32, padded with 0
    slot_mapping: torch.Tensor  # (num_tokens,) int64, cache slot (block * block_size + offset) per token
    max_query_len: int  # host-side copies, so kernels need no device sync
    max_seq_len: int
    # (num_tokens,) int64: per token, the sequence length its RoPE frequencies are computed for,
    # max(prompt length, position + 1) (`Request.rope_prefill_length`), read by length-dependent scalings
    # (`tokenmill.layers.rotary`); 1 for padding.
    rope_lengths: torch.Tensor | None = None
    # How many leading tokens belong to sequences past their prompt (a decode: its last token and any
    # draft tokens), which also need a logit each, so as many leading rows of the logits; the rest compute
    # prompts. None where the step does not say (a padded step). See `tokenmill.batch_rows`.
    num_decode_tokens: int | None = None
    # What `AttentionBackend.prepare` computed for this step, under keys of the backend's choosing
    # (layers with different specs share one metadata object).
    backend_data: dict[Any, Any] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


class AttentionBackend(abc.ABC):
    """Attention over the paged KV cache for a flattened, ragged batch (prefill, decode or both)."""

    @abc.abstractmethod
    def prepare(self, metadata: AttentionMetadata) -> None:
        """Called once per step before the layers run: precompute what every layer reuses.

        Store it in `metadata.backend_data`; the metadata object is shared by every backend of the step.
        """

    @abc.abstractmethod
    def forward(
        self,
        query: torch.Tensor,  # (num_tokens, num_heads, head_dim)
        key: torch.Tensor,  # (num_tokens, num_kv_heads, head_dim)
        value: torch.Tensor,  # (num_tokens, num_kv_heads, head_dim)
        kv_cache: torch.Tensor,  # this layer's tensor from KVCacheLayout.allocate
        metadata: AttentionMetadata,
    ) -> torch.Tensor:  # (num_tokens, num_heads, head_dim)
        """Write this step's keys and values at `slot_mapping`, then attend causally over each context."""


# --------------------------------------------------------------------------------------------------
# Memory, parallelism, quantization, execution
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryRequest:
    """What the user asked of the KV cache's memory; the backend turns it into bytes."""

    weights_bytes: int
    kv_cache_bytes: int | None = None  # an explicit size wins over the fraction
    memory_fraction: float = 0.9  # of the device memory that tokenmill may use in all
    # Runs one forward of the largest step the scheduler will build, on a scratch cache it frees
    # before returning; see `tokenmill_memory_budget`. None where the core has nothing to run.
    profile: Callable[[], None] | None = None


class Communicator(abc.ABC):
    """The collectives tensor parallelism needs, over one torch.distributed process group."""

    dist_backend: str  # "gloo", "nccl", "xccl", "hccl", ...
    world_size: int
    rank: int

    @abc.abstractmethod
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over all ranks; every rank gets the result."""

    @abc.abstractmethod
    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's `tensor` along `dim`, in rank order."""

    def close(self) -> None:
        """Release the process group before the rank's process ends (its collectives are over)."""


class ShardStyle(str, enum.Enum):
    """How a linear layer's weight is split over tensor-parallel ranks."""

    COLUMN = "column"  # output features split; outputs gathered or consumed locally
    ROW = "row"  # input features split; outputs all-reduced
    REPLICATE = "replicate"


class TensorParallelPlan(abc.ABC):
    """How a backend shards weights over ranks (alignment, padding, fused layouts are its choice)."""

    @abc.abstractmethod
    def shard(self, weight: torch.Tensor, style: ShardStyle, rank: int, world_size: int) -> torch.Tensor:
        """This rank's part of a (out_features, in_features) weight, or of a bias for COLUMN."""


@dataclass(frozen=True)
class GGMLWeight:
    """A linear weight as a GGUF checkpoint stores it: each row a run of ggml quantization blocks.

    The loader dequantizes every weight for the model, and keeps the blocks of the quantized ones so a
    backend whose kernels read a ggml type can run the checkpoint's own bytes (Q4_1: 0.625 bytes a
    weight against bf16's 2) with the numbers of the dequantized weight.
    """

    ggml_type: str  # gguf's GGMLQuantizationType name: "Q4_1", "Q8_0", ...
    blocks: torch.Tensor  # (out_features, bytes per row) uint8
    in_features: int


# Code types of `QuantizedWeight.codes`: unsigned integers of 2 to 8 bits, or fp8 bit patterns.
INTEGER_CODE_TYPES = tuple(f"uint{bits}" for bits in range(2, 9))
FP8_CODE_TYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


@dataclass(frozen=True)
class QuantizedWeight:
    """A pre-quantized linear weight in one normal form, whatever format the checkpoint stored it in.

    GPTQ, AWQ, compressed-tensors, fp8 checkpoints and GGUF blocks all come down to this: weight element
    (o, i) is ``scales[o, g] * value(codes[o, i]) + offsets[o, g]`` with ``g = i // group_size``, where
    value is the unsigned integer code itself, ``lookup[code]`` when a lookup table is given (GGUF's
    IQ4 types), or the fp8 number whose bits the code holds. Signed and zero-point schemes become
    unsigned codes and an offset (GPTQ's ``scale * (q - zero)`` is ``scale * q - scale * zero``; a
    K-quant's ``d * sc * q - dmin * m``): every format's own arithmetic is exact in float32, so this form
    loses nothing. A backend packs it for its kernels in `QuantMethod.prepare_quantized`.
    """

    format: str  # the checkpoint's format, for messages and method choice: "gptq", "awq", "fp8", ...
    code_type: str  # one of INTEGER_CODE_TYPES ("uint4": codes 0..15) or of FP8_CODE_TYPES
    codes: torch.Tensor  # (out_features, in_features) uint8
    scales: torch.Tensor  # (out_features, in_features // group_size) float32
    offsets: torch.Tensor | None  # like `scales`, or None where every offset is zero
    group_size: int  # inputs sharing one scale; in_features for per-channel (and per-tensor) scales
    # GPTQ's act-order (desc_act): stored column j holds input `input_order[j]`, so groups are contiguous.
    input_order: torch.Tensor | None = None  # (in_features,) int64, or None for the natural order
    lookup: torch.Tensor | None = None  # (2 ** bits,) float32 values of the integer codes, or None

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    @property
    def bits(self) -> int:
        return 8 if self.code_type in FP8_CODE_TYPES else int(self.code_type.removeprefix("uint"))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (out_features, in_features) weight, inputs in their natural order: the reference."""
        if self.code_type in FP8_CODE_TYPES:
            values = self.codes.view(FP8_CODE_TYPES[self.code_type]).float()
        elif self.lookup is not None:
            values = self.lookup.float()[self.codes.long()]
        else:
            values = self.codes.float()
        weight = values * self.scales.repeat_interleave(self.group_size, dim=1)
        if self.offsets is not None:
            weight = weight + self.offsets.repeat_interleave(self.group_size, dim=1)
        if self.input_order is not None:
            weight = torch.empty_like(weight).index_copy_(1, self.input_order, weight)
        return weight.to(dtype)


class QuantMethod(abc.ABC):
    """A quantization method a backend can run: prepare weights once, then matmul with them."""

    name: str  # what `--quantize NAME` selects
    # Pre-quantized checkpoint formats (`QuantizedWeight.format`) `prepare_quantized` takes; the core
    # refuses a checkpoint in any other format at start, naming the ones the backend runs.
    checkpoint_formats: frozenset[str] = frozenset()

    @abc.abstractmethod
    def prepare(self, weight: torch.Tensor) -> Any:
        """Turn a dense (out_features, in_features) weight into this method's packed form."""

    def prepare_ggml(self, weight: torch.Tensor, ggml: GGMLWeight) -> Any | None:
        """The prepared form of a weight from its GGUF blocks, or None (the default) to use `prepare`.

        `weight` is the blocks dequantized to the model's dtype. `matmul` with the result must compute
        `x @ weight.T` at least as exactly as with `prepare(weight)` (the conformance suite checks it
        against the float64 product with the blocks' exact values): a speed path, not a new quantization.
        A `--quantize` method may quantize further here as in `prepare` (the CPU's int8-activations does):
        that error is its business.
        """
        return None

    def prepare_quantized(self, weight: QuantizedWeight) -> Any:
        """The prepared form of a pre-quantized checkpoint's weight, for a method whose
        `checkpoint_formats` include ``weight.format``. `matmul` with it must compute ``x @ W.T`` for
        ``W = weight.dequantize()`` at least as exactly as `F.linear` with W in the activations' dtype."""
        raise NotImplementedError(f"{type(self).__name__} does not run pre-quantized checkpoints")

    @abc.abstractmethod
    def matmul(self, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        """`x @ weight.T` with the prepared weight; `x` is (num_tokens, in_features)."""

    def dequantize(self, prepared: Any) -> torch.Tensor | None:
        """The dense (out_features, in_features) weight `prepared` stands for, or None (the default).

        A method that answers is held by the conformance suite to the contract of a quantized kernel:
        `matmul` at least as exact, against the float64 product with this weight, as `F.linear` run
        with this weight in the activations' dtype. Its quantization error is the method's business.
        """
        return None

    def rows(self, prepared: Any, ids: torch.Tensor) -> torch.Tensor | None:
        """Rows `ids` (1-D, int64) of the dense weight `prepared` stands for, exactly, in the model's dtype, as
        a (len(ids), in_features) tensor; or None (the default) where the method does not read single rows.

        Where it does, an input embedding tied to the output head looks its rows up in the head's prepared
        weight and drops its own copy (`tokenmill.layers.vocab_parallel.Embedding`): the weight is held once.
        """
        return None

    def serialize(self, prepared: Any) -> dict[str, torch.Tensor] | None:
        """`prepared` as named CPU tensors the engine may keep on disk (`tokenmill.weight_cache`), or None
        (the default): not cacheable, prepared again at every start.

        The engine gives them back to `deserialize` at a later start instead of dequantizing and
        preparing the checkpoint again. Its cache key covers the checkpoint file, the tokenmill and torch
        versions, and the source of the module defining this method with the compiled extensions beside
        it, so a change to the packing code invalidates what it wrote.
        """
        return None

    def deserialize(self, tensors: dict[str, torch.Tensor]) -> Any:
        """The prepared form back from what `serialize` returned. The tensors are memory-mapped from
        the cache file: keep them as they are (no copy) and never write to them."""
        raise NotImplementedError(f"{type(self).__name__} does not serialize its prepared weights")


class LayerOps:
    """The elementwise ops between a decoder layer's matmuls, written as plain PyTorch: the reference.

    A backend returns a subclass from `tokenmill_layer_ops` to run any of them as fused kernels (in
    PyTorch each is several ops, each paying dispatch for a few thousand elements). An override must
    give the reference's result up to the dtype's rounding; the conformance suite checks it.
    """

    def rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 offset: float = 0.0):
        """`x (+ residual)` over its root mean square, times `weight + offset`, computed in float32.

        Without a residual returns the normalised tensor; with one, `(normalised, x + residual)`, the
        sum being the next layer's residual.
        """
        if residual is not None:
            x = x + residual
            residual = x
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        out = (h * (weight.float() + offset)).to(x.dtype)
        return out if residual is None else (out, residual)

    def rotary(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate-half RoPE: query (tokens, heads, head_dim), key (tokens, kv_heads, head_dim), tables
        (max_positions, head_dim) indexed by each token's position. An override may rotate in place."""
        cos = cos[positions].unsqueeze(1)
        sin = sin[positions].unsqueeze(1)
        return query * cos + _rotate_half(query) * sin, key * cos + _rotate_half(key) * sin

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """`silu(gate) * up` where gate and up are the two halves of the last dimension."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class TokenMask:
    """Applies a grammar's allowed tokens to the logits: the reference, in plain PyTorch.

    `bitmask` is int32, (rows, ceil(vocab / 32)), on the logits' device: bit j of word w allows token
    32 * w + j (xgrammar's layout); a row with every bit set is left as it was. `apply` returns the
    logits with every disallowed token at -inf, for the whole batch at once; it may work in place. A
    backend returns a subclass from `tokenmill_token_mask` to do it in one kernel; an override must give
    exactly the reference's result.
    """

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
        shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
        # bitwise_right_shift, not `>>`: torch-xla 2.9 gives wrong bits for `tensor >> tensor` (measured).
        allowed = (bitmask[:, :, None].bitwise_right_shift(shifts) & 1).bool().flatten(1)[:, : logits.shape[1]]
        return logits.masked_fill(~allowed, float("-inf"))


class GreedyPick:
    """Greedy decoding's choice for each row of a step's logits: the reference, in plain PyTorch.

    `pick` takes float32 logits (rows, vocab) and returns the int64 tokens (rows,): each row's first
    largest logit, as `argmax` chooses; with `logprobs`, also their float32 log-softmax (rows,), else None.
    A backend returns a subclass from `tokenmill_greedy_pick` to do it in one kernel; an override must
    choose exactly the reference's tokens, and give its log-probabilities to float32 rounding.
    """

    def pick(self, logits: torch.Tensor, logprobs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = logits.argmax(dim=-1)
        if not logprobs:
            return tokens, None
        return tokens, torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)


@dataclass
class LoRABatch:
    """Which LoRA adapter each token of a step uses, shared by every adapted linear layer of the step.

    Built on the host once per step and sent over in one copy (`tokenmill.lora.build_lora_batch`). Slot 0
    is the base model, slots 1..N the adapters loaded at start, in their order. `token_indices[start:end]`
    are the rows of the step's tokens that use `slot`, for each ``(slot, start, end)`` of `segments`
    (sorted by slot; base-model rows are in no segment). A step in which no token uses an adapter has
    no LoRABatch at all.
    """

    token_slots: torch.Tensor  # (num_tokens,) int64: each token's slot, 0 for the base model and padding
    token_indices: torch.Tensor  # (num_adapter_tokens,) int64: adapter tokens' rows, grouped by slot
    segments: tuple[tuple[int, int, int], ...]  # (slot, start, end) into token_indices, host ints
    # What `LoRAMethod.prepare_step` computed for this step, under keys of the method's choosing.
    method_data: dict[Any, Any] = field(default_factory=dict)

    @property
    def slots(self) -> tuple[int, ...]:
        """The slots this step uses, ascending."""
        return tuple(slot for slot, _, _ in self.segments)


class LoRAMethod:
    """Adds each token's LoRA adapter to an adapted linear layer's output: the reference, a segmented matmul.

    For every row ``i`` whose slot is ``s``: ``y[i] += B[s] @ (A[s] @ x[i])``, computed once per adapted
    layer per step, segment by segment (tokens grouped by adapter: one gather, two small matmuls and one
    scatter-add per adapter in the step, never a loop over tokens). A backend returns a subclass from
    `tokenmill_lora_method` to run it as a grouped GEMM, SGMV or a fused kernel; an override must give this
    reference's result up to the dtype's rounding (the conformance suite checks it).
    """

    def prepare(self, a: torch.Tensor, b: torch.Tensor) -> Any:
        """One layer's adapters in this method's form, once at load.

        `a` is (num_slots, rank, in_features) and `b` (num_slots, out_features, rank), in the model's
        dtype on its device: slot 0 is zeros (the base model), each adapter's scale is already in its B,
        and adapters of lower rank are padded with zeros. Over tensor-parallel ranks they are this rank's
        part, cut as the layer's weight is.
        """
        return a, b

    def prepare_step(self, batch: LoRABatch) -> None:
        """Called once per step before the layers run: precompute what every layer reuses, into
        `batch.method_data`. The reference needs nothing."""

    def apply(self, y: torch.Tensor, x: torch.Tensor, prepared: Any, batch: LoRABatch) -> torch.Tensor:
        """`y` (num_tokens, out_features) plus every token's adapter applied to its row of `x`
        (num_tokens, in_features); `y` is the layer's fresh output and may be updated in place."""
        a, b = prepared
        for slot, start, end in batch.segments:
            rows = batch.token_indices[start:end]
            y.index_add_(0, rows, (x.index_select(0, rows) @ a[slot].T) @ b[slot].T)
        return y


class MoEMethod:
    """Runs a mixture-of-experts layer's experts over a flat batch: the reference, in plain PyTorch.

    Each token goes to the `top_k` experts its router scores highest and gets their outputs summed,
    weighted by the routing weights. An expert is a SwiGLU MLP, ``down @ (silu(gate @ x) * (up @ x))``.
    The reference sorts the step's (token, expert) pairs by expert and runs one batched matmul pair per
    expert that receives tokens (an expert receiving none costs nothing), then sums each token's weighted
    outputs in ascending expert order (transformers' order). A backend returns a subclass from
    `tokenmill_moe_method` to run them as a grouped GEMM or a fused kernel; an override must give this
    reference's result up to the dtype's rounding (the conformance suite checks it).
    """

    # Whether `apply` never reads a device value back to the host, so a step running it may be captured as
    # a graph. The reference reads each expert's token count (one sync per layer): a backend that captures
    # steps keeps models with such a method eager, or returns a method of its own that sets this.
    graph_capturable = False

    def prepare(self, gate_up: torch.Tensor, down: torch.Tensor) -> Any:
        """One layer's experts in this method's form, once at load.

        `gate_up` is (num_experts, 2 * intermediate, hidden): each expert's gate rows, then its up rows;
        `down` is (num_experts, hidden, intermediate); both in the model's dtype on its device. Over
        tensor-parallel ranks they are this rank's slice of every expert's intermediate features (the
        layer sums the ranks' outputs).
        """
        return gate_up, down

    def route(self, router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(num_tokens, top_k) float32 routing weights and int64 expert ids, from (num_tokens, num_experts)
        router logits: the softmax over experts in float32, its `top_k` largest, divided by their sum when
        `renormalize` (Mixtral, Qwen3-MoE; Qwen2-MoE keeps the softmax's values)."""
        weights, ids = torch.softmax(router_logits.float(), dim=-1).topk(top_k, dim=-1)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids

    def experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, prepared: Any) -> torch.Tensor:
        """(num_tokens, hidden): for each token t, ``sum_j weights[t, j] * expert[ids[t, j]](x[t])``, summed in
        float32, experts in ascending order, and returned in `x`'s dtype.

        The (token, expert) pairs are sorted by expert once, so each expert's inputs are one contiguous slice
        of a single gather, run through `expert_mlp`; the outputs go back to their pairs in one copy. A
        subclass may override `expert_mlp` alone to run each expert on its own kernels.
        """
        num_tokens, top_k = ids.shape
        ids, slots = ids.sort(dim=1)  # a token's outputs are summed in ascending expert order
        weights = weights.gather(1, slots)
        order = ids.flatten().argsort(stable=True)
        rows = x.index_select(0, order // top_k)
        outputs, start = [], 0
        # Counted on the host, where they are needed anyway: XLA aborts the process on a device bincount
        # (torch-xla 2.9, measured), whose output size depends on the data.
        for expert, count in enumerate(torch.bincount(ids.flatten().cpu()).tolist()):
            if count:
                outputs.append(self.expert_mlp(rows[start:start + count], prepared, expert))
                start += count
        pairs = torch.empty(num_tokens * top_k, x.shape[1], dtype=torch.float32, device=x.device)
        pairs = pairs.index_copy_(0, order, torch.cat(outputs).float()).view(num_tokens, top_k, -1)
        pairs = pairs * weights[:, :, None]
        out = pairs[:, 0]
        for slot in range(1, top_k):
            out = out + pairs[:, slot]
        return out.to(x.dtype)

    def expert_mlp(self, rows: torch.Tensor, prepared: Any, expert: int) -> torch.Tensor:
        """Expert `expert`'s SwiGLU MLP over `rows` (num_rows, hidden), the inputs of the tokens sent to it."""
        gate_up, down = prepared
        gate, up = F.linear(rows, gate_up[expert]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, down[expert])

    def apply(self, x: torch.Tensor, router_logits: torch.Tensor, prepared: Any, top_k: int,
              renormalize: bool) -> torch.Tensor:
        """The layer's output for `x` (num_tokens, hidden) given its router's logits: `route`, then `experts`."""
        weights, ids = self.route(router_logits, top_k, renormalize)
        return self.experts(x, weights, ids, prepared)


class StaticShapeMoEMethod(MoEMethod):
    """Every expert over every token, each weighted by its routing weight (zero where not routed): no
    data-dependent shapes and no host reads, for backends that compile a graph per shape (XLA, HPU
    graphs) or capture graphs. Costs `num_experts / top_k` times the reference's expert FLOPs.

    Sums in ascending expert order, as the reference does, so only the matmuls' row blocking can differ.
    """

    graph_capturable = True

    def experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, prepared: Any) -> torch.Tensor:
        gate_up, _ = prepared
        num_experts = gate_up.shape[0]
        combine = torch.zeros(x.shape[0], num_experts, dtype=torch.float32, device=x.device)
        combine = combine.scatter_add(1, ids, weights.float())
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        for expert in range(num_experts):
            out = out + combine[:, expert:expert + 1] * self.expert_mlp(x, prepared, expert).float()
        return out.to(x.dtype)


@dataclass(frozen=True)
class ShapeBuckets:
    """Static shapes for backends that compile per shape; the scheduler pads each step up to them.

    `None` from the hook means dynamic shapes. Sizes are sorted; a step larger than the last token or
    sequence bucket is never scheduled. The model runner pads every step's tokens and sequences up to a
    bucket, and its block tables up to a `blocks_per_seq` bucket: the smallest that holds the step's
    widest table, so attention over a padded table costs what the step's longest context needs, not
    the model's whole context. Without `blocks_per_seq` (None) every table is padded to the model's
    longest context. Width buckets past that context are clamped to it, and the last must reach it
    (`tokenmill.model_runner.StepPadding` checks). Warm-up runs every (tokens, sequences, width, decode
    or prefill, logit rows) shape the scheduler can make, so serving compiles none.
    """

    num_tokens: tuple[int, ...]  # flattened batch sizes in tokens
    num_seqs: tuple[int, ...]  # sequences per step
    blocks_per_seq: tuple[int, ...] | None = None  # block-table widths, in blocks; None: the longest context's

    def __post_init__(self) -> None:
        for name in ("num_tokens", "num_seqs", "blocks_per_seq"):
            sizes = getattr(self, name)
            if sizes is None and name == "blocks_per_seq":
                continue
            if not sizes or list(sizes) != sorted(set(sizes)) or sizes[0] < 1:
                raise ValueError(f"ShapeBuckets.{name} must be a non-empty increasing tuple of positive ints")

    @staticmethod
    def _bucket(sizes: tuple[int, ...], n: int) -> int | None:
        return next((size for size in sizes if size >= n), None)

    def pad_num_tokens(self, n: int) -> int | None:
        """The smallest token bucket that holds `n`, or None when `n` is over the largest."""
        return self._bucket(self.num_tokens, n)

    def pad_num_seqs(self, n: int) -> int | None:
        """The smallest sequence bucket that holds `n`, or None when `n` is over the largest."""
        return self._bucket(self.num_seqs, n)


ModelStep = Callable[..., torch.Tensor]
"""A callable running one forward step of the model: what `tokenmill_compile_model` returns."""


# --------------------------------------------------------------------------------------------------
# Models that own their KV cache
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlotBatch:
    """One step for a `SlotModel`: each sequence's new tokens, addressed by the slot holding its cache.

    Host (CPU) tensors: a compiled model feeds its runtime from host buffers and pads them to its own
    shapes, so the core sends nothing to a device. Sequences are in the scheduler's order, not sorted
    by slot; every slot appears at most once.
    """

    input_ids: torch.Tensor  # (num_tokens,) int64, every sequence's tokens this step, sequence after sequence
    positions: torch.Tensor  # (num_tokens,) int64, each token's position in its sequence
    slot_ids: torch.Tensor  # (num_seqs,) int64, the slot of each sequence, in [0, num_slots)
    query_start_loc: torch.Tensor  # (num_seqs + 1,) int64, sequence i's tokens are [qsl[i], qsl[i+1])
    # (num_seqs,) int64: how many trailing tokens of each sequence need next-token logits: 1 to sample,
    # more for prompt logprobs, 0 for a prefill chunk that samples nothing.
    num_logits: torch.Tensor
    is_decode: bool  # every sequence feeds one token after its first: a token-generation step

    @property
    def num_seqs(self) -> int:
        return self.slot_ids.shape[0]


class SlotModel(abc.ABC):
    """A whole model that keeps its own KV cache in `num_slots` fixed sequence slots (Neuron's compiled models).

    What `tokenmill_model_executor` returns. The core builds no paged cache for it: it gives each running
    request one slot (so at most `num_slots` run at once, the rest wait), schedules, samples and
    detokenizes; the model computes and caches. The order of calls for one slot is strict: a request's
    first step starts at position 0, each later step starts where the previous one ended, and `free` is
    called when the request ends or is preempted, before the slot goes to another request.

    The two flags say what the compiled program can run; the scheduler honours them.
    """

    num_slots: int  # sequences the model holds at once (Neuron: the compiled batch size)
    max_seq_len: int  # tokens one slot holds, prompt and output together (Neuron: the compiled sequence length)
    # False: a step holds prefills only or decodes only (separate context-encoding and token-generation
    # programs); the scheduler then runs prefill steps while any request can start, decode steps otherwise.
    mixes_prefill_and_decode: bool = True
    # False: a prompt is fed whole in one step from position 0, so prompts longer than the step's token
    # budget are refused when added.
    chunked_prefill: bool = True

    @abc.abstractmethod
    def forward(self, batch: SlotBatch) -> torch.Tensor:
        """Run the step, writing each sequence's keys and values into its slot; return the logits.

        Returns (sum(batch.num_logits), vocab) float logits on the platform's device, each sequence's
        rows in order (a Neuron adapter with on-device sampling off returns ``output[:, -1, :]`` for
        sequences asking one row). Padding to compiled shapes and sorting by slot are the model's own
        business.
        """

    @abc.abstractmethod
    def free(self, slot: int) -> None:
        """The request in `slot` ended or was preempted: the slot's cached tokens are dead."""

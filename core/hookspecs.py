"""The backend contract: what a hardware plugin provides, as pluggy hook specifications.

A vendor can write a plugin from this file alone. A plugin is a module (or any object) with functions
named like the hooks below, marked with `tokenmill.hookimpl`, and registered under the entry-point
group ``tokenmill.backends``::

    [project.entry-points."tokenmill.backends"]
    mychip = "tokenmill_mychip"

How the hooks are called:

* Every plugin answers `tokenmill_discover`, in its own try/except: a plugin that raises is reported
  as failed, never takes the process down.
* Once a backend is chosen, every other hook is called on that backend alone (plus the core's
  torch-native defaults, registered ``trylast``, for the optional hooks). All hooks are
  ``firstresult``: the chosen plugin's non-None answer wins, else the default's.
* Hooks are called while the engine is built, never in the step loop: they return objects
  (`tokenmill.interfaces`) that the engine then calls directly.
* Required hooks: `tokenmill_discover` (checked at load) and, for a backend to be *usable*,
  `tokenmill_init_device` and either the paged-cache pair `tokenmill_kv_cache_layout` +
  `tokenmill_attention_backend` or, for a backend whose model owns its cache, `tokenmill_model_executor`.
  A plugin lacking them is listed as "incomplete" and cannot be chosen.
* Arguments are passed by keyword; an implementation may accept fewer than the spec names
  (pluggy's opt-in arguments), so the contract grows by adding arguments, never by renaming.

A plugin is refused at load, with a message naming it, when it defines a ``tokenmill_*`` function
that matches no hook here, when an implementation asks for an argument the spec does not give, or
when it lacks `tokenmill_discover`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tokenmill.interfaces import (
        AttentionBackend,
        AttentionSpec,
        Communicator,
        DevicePlatform,
        Discovery,
        GreedyPick,
        KVCacheLayout,
        KVCacheShape,
        LayerOps,
        LoRAMethod,
        MemoryRequest,
        MoEMethod,
        QuantMethod,
        ShapeBuckets,
        SlotModel,
        TensorParallelPlan,
        TokenMask,
    )
    from tokenmill.loader.checkpoint import Checkpoint

PROJECT = "tokenmill"
ENTRY_POINT_GROUP = "tokenmill.backends"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

REQUIRED_AT_LOAD = ("tokenmill_discover",)
REQUIRED_TO_RUN = ("tokenmill_init_device",)
# A usable backend also implements one of these: the core's models over its paged cache, or its own model.
PAGED_CACHE_HOOKS = ("tokenmill_kv_cache_layout", "tokenmill_attention_backend")
OWN_MODEL_HOOKS = ("tokenmill_model_executor",)


# --------------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def tokenmill_discover() -> Discovery:
    """Report whether this backend's hardware is here, which devices it has, and the backend's priority.

    Called in the launcher process of every command, for every registered plugin, so it must be cheap:

    * import a vendor library only if it is installed (check with ``importlib.util.find_spec``), and
      prefer management libraries (NVML, amdsmi, HLML) or device files to the compute runtime;
    * never initialise a device context in this process (a CUDA context breaks forked workers);
    * explain a "no": the status, a reason a user can act on, and the ``install_extra`` that would
      install the missing vendor library.

    An exception raised here is caught and reported as status "discovery failed".
    Required. Returns a `Discovery`.
    """


# --------------------------------------------------------------------------------------------------
# Device and memory
# --------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def tokenmill_init_device(device_index: int) -> DevicePlatform:
    """Set up device `device_index` in the process that will run the model, and describe it.

    This is where a backend binds the process to its device (``torch.cuda.set_device``), sets thread
    counts, or initialises its runtime. Returns a `DevicePlatform`: the torch device, the dtypes the
    kernels support, and the dtype ``--dtype auto`` should become. Required to run.
    """


@hookspec(firstresult=True)
def tokenmill_interpreter_platform() -> DevicePlatform | None:
    """A platform on which this backend's kernels run through a software interpreter on host tensors.

    For checking kernels where the hardware is absent (CI, a laptop): ``tokenmill conformance
    --backend NAME --interpret`` runs the kernel-level cases (attention, KV cache, layer ops,
    quantized matmuls) on this platform instead of `tokenmill_init_device`'s, without discovery
    having to find the hardware. Turn the interpreter on here (Triton's ``TRITON_INTERPRET=1``)
    before any kernel is defined; the other hooks then hand out the same kernels, interpreted.
    Default: None (the backend has no interpreter).
    """


@hookspec(firstresult=True)
def tokenmill_memory_budget(device: torch.device, request: MemoryRequest) -> int:
    """The bytes the KV cache may take on `device`, now that the weights are loaded.

    `request` carries the weights' size, an explicit size if the user gave one (which should win) and
    the fraction of device memory tokenmill may use in all (``--cuda-memory-fraction``, alias
    ``--gpu-memory-utilization``: weights, activations and KV cache together).

    `request.profile`, when not None, runs one forward at the largest step the scheduler will build
    (max_num_batched_tokens tokens), so the backend can measure peak activation memory with its own
    counters before sizing the cache: reset the device's peak-memory counter, call it, read the peak,
    and give the KV cache ``fraction * total - peak``. It allocates a scratch KV cache through
    `KVCacheLayout.allocate` for that one step and drops it before returning (return the freed
    memory to the device with the allocator's own call if it caches blocks). A backend whose
    activations are negligible next to its memory (the CPU) need not call it.

    The core divides the answer by `KVCacheLayout.bytes_per_block()` to size the cache. Default: the
    explicit size; without one the default raises, since only the backend knows its device's memory.
    """


@hookspec(firstresult=True)
def tokenmill_kv_cache_layout(shape: KVCacheShape, device: torch.device) -> KVCacheLayout:
    """The paged KV cache's geometry for a model of this `shape` on `device`.

    The returned `KVCacheLayout` fixes the block size (16 on CPU, 64 or 128 on others), how blocks are
    laid out in memory, how they are allocated and how blocks are copied (prefix sharing, preemption).
    The attention backend from `tokenmill_attention_backend` must read this layout. Required to run.

    ``shape.cache_dtype`` is what the user asked the cache to store (``--kv-cache-dtype``: "auto" for
    ``shape.dtype``, or bfloat16, fp8_e4m3, fp8_e5m2, int8). Declare in `KVCacheLayout.cache_dtypes` the
    ones the layout and its attention can store (the core refuses the others at start, naming these),
    size `bytes_per_block` for the one asked, and say in `kv_scales` how a one-byte format's scales are
    kept; the conformance suite then checks attention over each declared dtype.
    """


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def tokenmill_attention_backend(spec: AttentionSpec, layout: KVCacheLayout) -> AttentionBackend:
    """The attention kernels for layers of this `spec` over caches of this `layout`.

    Called once per distinct spec when the model is built. The returned `AttentionBackend` handles a
    flattened ragged batch in which prefills, prefill chunks and decodes are mixed, and must not loop
    over sequences in Python per layer. Required to run.
    """


# --------------------------------------------------------------------------------------------------
# Parallelism
# --------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def tokenmill_communicator(world_size: int, rank: int, device: torch.device) -> Communicator:
    """The communicator for tensor parallelism over `world_size` ranks, this process being `rank`.

    Chooses the torch.distributed backend (gloo, nccl, xccl, hccl, XLA collectives) and initialises
    the process group when `world_size` > 1. Default: gloo through torch.distributed.
    """


@hookspec(firstresult=True)
def tokenmill_tensor_parallel_plan(world_size: int) -> TensorParallelPlan:
    """How weights are sharded over `world_size` ranks on this backend.

    Default: even splits along the output (column) or input (row) features.
    """


@hookspec(firstresult=True)
def tokenmill_ray_resources(num_devices: int) -> dict[str, float]:
    """The Ray resources one model-server replica on `num_devices` of this backend's devices asks for.

    `tokenmill serve --ray` starts each replica as a Ray actor with these resources, so Ray places it on
    a node that has the devices and, for the accelerators Ray manages itself (``GPU``, ``TPU``, ``HPU``,
    ``neuron_cores``), hands it those devices through the vendor's visibility variable. Called in the
    router's process, which may lack the device: it must not touch one. Default: ``{"CPU": num_devices}``.
    """


# --------------------------------------------------------------------------------------------------
# Quantization
# --------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def tokenmill_quantization_methods() -> list[QuantMethod]:
    """The quantization methods this backend can run, each a `QuantMethod` object.

    The core validates ``--quantize NAME`` against the names returned here, never against a list of
    its own. A pre-quantized checkpoint runs on the dense linear method, or else the first method here,
    whose `QuantMethod.checkpoint_formats` include its format; with none, the start is refused. Default: none.
    """


@hookspec(firstresult=True)
def tokenmill_dense_linear_method(dtype: torch.dtype) -> QuantMethod | None:
    """How this backend runs the *unquantized* linear layers of a model in `dtype`, or None.

    A `QuantMethod` whose `prepare` re-lays the dense weight out for the device's GEMM library (the
    CPU backend pre-packs bf16 weights for oneDNN, twice as fast as `F.linear` at decode sizes) and
    whose `matmul` must give the same result as ``x @ weight.T``. Applied to every linear layer,
    the output head included, when no ``--quantize`` is given. Default: None (`F.linear`).
    """


@hookspec(firstresult=True)
def tokenmill_layer_ops(dtype: torch.dtype) -> LayerOps | None:
    """Fused kernels for the elementwise ops between matmuls in `dtype`, as a `LayerOps` subclass.

    Residual add + RMSNorm, rotary embedding and SiLU-and-multiply run once per layer per step; as
    PyTorch ops they are ~25 small kernels a layer, which at decode sizes cost as much as attention.
    Each override must match `LayerOps`' result up to the dtype's rounding. Default: None (the
    PyTorch reference ops).
    """


@hookspec(firstresult=True)
def tokenmill_lora_method(dtype: torch.dtype) -> LoRAMethod | None:
    """How this backend adds LoRA adapters to linear layers in `dtype`, as a `LoRAMethod` subclass, or None.

    Called once when adapters are loaded (``--lora-adapters``, ``--lora-modules``). Each step, every
    adapted linear layer (q/k/v, o, gate/up, down) calls the method's `apply` once with the layer's input,
    its output and a `LoRABatch` saying which adapter each token uses; tokens of different adapters and
    of the base model share one batch. `prepare` receives each layer's adapters stacked by slot once at
    load. The result must match `LoRAMethod`'s segmented matmul up to the dtype's rounding. A backend
    whose `tokenmill_compile_model` captures the step must run the adapted layers' LoRA too, or leave
    steps with a `LoRABatch` to the model's own forward. Default: None (the `LoRAMethod` reference).
    """


@hookspec(firstresult=True)
def tokenmill_moe_method(dtype: torch.dtype) -> MoEMethod | None:
    """How this backend runs the experts of mixture-of-experts layers (Mixtral, Qwen2-MoE, Qwen3-MoE) in
    `dtype`, as a `MoEMethod` subclass, or None.

    Called once when a model with such layers is built. `prepare` receives each layer's stacked expert
    weights once at load (gate and up fused: (experts, 2 * intermediate, hidden); down: (experts, hidden,
    intermediate); this rank's slice of each expert under tensor parallelism) and may re-lay them out for
    the device. Each step, every such layer calls `apply` once with its input and its router's logits:
    routing (softmax, top-k, optional renormalization) and the grouped expert matmuls over the step's
    tokens sorted by expert are the method's. The result must match `MoEMethod`'s up to the dtype's
    rounding, whatever the routing: experts receiving no token, one, or all. Default: None (the
    `MoEMethod` reference, one batched matmul pair per active expert in PyTorch; it reads each expert's
    token count back to the host, so a `tokenmill_compile_model` that captures graphs must leave a model
    whose method is not `graph_capturable` eager: `tokenmill.layers.moe.graph_capturable(model)` says).
    """


@hookspec(firstresult=True)
def tokenmill_token_mask() -> TokenMask | None:
    """How this backend applies grammar masks (structured output) to a step's logits, as a `TokenMask`.

    Called once when the engine is built. In a step where any request has a grammar, the sampler calls
    its `apply` once with the float32 logits of every sampled row and one int32 bitmask for the whole
    batch (xgrammar's layout, on the logits' device; rows without a grammar have every bit set), after
    the biases and penalties and before temperature and the top-k/top-p filters. The result must equal
    `TokenMask`'s exactly: disallowed tokens at -inf, every other logit unchanged. Default: `TokenMask`
    (PyTorch: unpack the bits, one `masked_fill` over the batch).
    """


@hookspec(firstresult=True)
def tokenmill_greedy_pick() -> GreedyPick | None:
    """How this backend picks greedy tokens and their log-probabilities from a step's logits, as a `GreedyPick`.

    Called once when the engine is built. In a step where every row is greedy (no sampling, penalty, bias
    or watermark, and no top-n alternatives asked for), the sampler calls its `pick` once with the float32
    logits of the batch, the grammar mask already applied. The tokens must equal `GreedyPick`'s exactly
    (the first of each row's largest logits); the log-probabilities, its to float32 rounding. Default:
    `GreedyPick` (PyTorch: argmax, and log_softmax with a gather where log-probabilities are asked for).
    """


# --------------------------------------------------------------------------------------------------
# Execution: compilation, graphs, static shapes, whole-model backends
# --------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def tokenmill_shape_buckets(max_num_tokens: int, max_num_seqs: int) -> ShapeBuckets | None:
    """The static shapes this backend compiles for, or None for dynamic shapes.

    Backends that compile per shape (XLA, HPU graphs, Neuron) declare buckets up to the scheduler's
    limits; the scheduler never exceeds the largest, and the model runner pads each step's tokens,
    sequences and block-table width up to a bucket (the padding contract is `AttentionMetadata`'s:
    slot -1 writes nothing, padded sequences have length 0). Block-table widths are buckets too when
    `ShapeBuckets.blocks_per_seq` is given (in blocks of the backend's layout; the core clamps them to
    the model's context, which the largest must reach), else every table is as wide as that context.
    Warm-up runs every reachable padded shape before the server reports healthy. Default: None.
    """


@hookspec(firstresult=True)
def tokenmill_compile_model(model: nn.Module, buckets: ShapeBuckets | None,
                            capture_sizes: tuple[int, ...] | None) -> Any:
    """Compile or capture the model's forward step; return the callable the engine will run.

    For example ``torch.compile``, CUDA/HPU graph capture per bucket, or XLA compilation. The
    callable takes the same arguments as ``model.forward``. Warm-up compiles every bucket before the
    server reports healthy. Called after the KV cache is allocated, so captured graphs may read it.

    `capture_sizes` are the decode batch sizes (sequences of one token each) to capture as graphs,
    from ``--cuda-graphs`` (TGI's flag): ``()`` means capture none, run eager; None means the
    backend decides. A backend without graphs ignores it. Default: the model itself (eager).
    """


@hookspec(firstresult=True)
def tokenmill_model_executor(model_id: str, config: Any, checkpoint: Checkpoint, dtype: torch.dtype,
                             device: torch.device, max_num_seqs: int, max_model_len: int) -> SlotModel | None:
    """A whole model that owns its KV cache (Neuron's ahead-of-time compiled models), or None.

    Called once the checkpoint is loaded, with `config` (its transformers config), `checkpoint` (weights,
    tokenizer), the engine's `dtype` and `device`, and the sizes to build for: `max_num_seqs` concurrent
    sequences (a Neuron plugin compiles ``batch_size``) of at most `max_model_len` tokens
    (``sequence_length``). Returning a `SlotModel` replaces the core's model, paged KV cache, memory
    budget, attention and compilation hooks for this engine: the core gives each running request one
    of the model's slots, still schedules, batches continuously over the slots, samples and detokenizes.
    The model may have fewer slots or a shorter length than asked; the engine uses what it has.

    Prefix caching is then unavailable (the cached keys and values are the model's, by slot) and is
    reported so; tensor parallelism is the model's own affair (the engine runs one rank). A Neuron
    adapter maps `SlotBatch` onto ``forward(input_ids, position_ids, seq_ids, sampling_params)``: slots
    are ``seq_ids``, tokens padded per sequence to the compiled shape, ids cast to int32.
    Default: None (the core's models over the paged cache).
    """

"""The transformers fallback: an architecture tokenmill has no file for runs on transformers' own modeling code.

The engine's flattened batch (every sequence's tokens concatenated) goes through the transformers model as
one batch row with explicit `position_ids`, so rotary and learned position embeddings see each token's own
position. Attention is the only place tokens of different sequences could mix, and it is ours: the model's
attention modules call the function registered here under `ATTENTION_NAME` (transformers'
`AttentionInterface`), which writes keys and values into tokenmill's paged cache and attends through the
backend's `AttentionBackend`, exactly as tokenmill's own models do. The step rides the model's keyword
arguments down to every attention call (transformers passes them through), as TGI's transformers backend does.
Continuous batching, chunked prefill, prefix caching and speculative verification then work unchanged.

What each layer's attention looks like (heads, kv heads, head size, scale, sliding window, soft cap) is
learned by a probe: one forward of two tokens through the model built on the meta device (no memory, no
weights), recording what each layer passes to the attention function. The probe also finds what the
fallback cannot run (layers that never call attention, masks or biases of the model's own, non-causal
attention, attention sinks, layers of different shapes), and refuses it naming why.
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from tokenmill.interfaces import AttentionBackend, AttentionMetadata, AttentionSpec, KVCacheShape
from tokenmill.layers.rotary import rope_depends_on_length, rope_parameters
from tokenmill.parallel import SINGLE_RANK, ParallelContext

logger = logging.getLogger(__name__)

ATTENTION_NAME = "tokenmill_paged"  # our entry in transformers' attention-function registry
STEP_KWARG = "tokenmill_step"  # the keyword argument that carries the step to the attention function
# Mixture-of-experts layers loop over their experts: correct in every dtype on every device (the grouped
# kernel transformers defaults to takes bfloat16 only on some).
EXPERTS = "eager"
ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention"}  # transformers' `config.layer_types` we serve
RECURRENT_LAYER_TYPES = {"linear_attention", "mamba"}  # layer types that carry a state from token to token


def refused(reason: str) -> Exception:
    """The error saying why the fallback cannot run a model."""
    from tokenmill.models import UnsupportedArchitectureError  # defined beside the selection, which imports us

    return UnsupportedArchitectureError(f"the transformers fallback cannot run this model: {reason}")


@dataclass(frozen=True)
class LayerAttention:
    """What one layer passes to the attention interface, as the probe saw it."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    sliding_window: int | None
    softcap: float | None

    def spec(self, dtype: torch.dtype) -> AttentionSpec:
        return AttentionSpec(self.num_heads, self.num_kv_heads, self.head_dim, self.scale, dtype,
                             sliding_window=self.sliding_window, logit_softcap=self.softcap)


@dataclass(frozen=True)
class PagedStep:
    """One step as every attention call needs it: the layer's backend and cache, the batch's metadata."""

    backends: Sequence[AttentionBackend]  # by layer index
    kv_caches: Sequence[torch.Tensor]  # by layer index
    metadata: AttentionMetadata


class _Probe:
    """Records each layer's attention call during the probe forward; collects what the fallback cannot run."""

    def __init__(self) -> None:
        self.layers: dict[int, LayerAttention] = {}
        self.problems: list[str] = []

    def record(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: Any, scaling: float | None, kwargs: dict[str, Any]) -> None:
        name = type(module).__name__
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            self.problems.append(f"its attention module {name} has no layer_idx to find the layer's cache")
            return
        if attention_mask is not None:
            self.problems.append(f"{name} passes its own attention mask or bias (e.g. ALiBi), which paged attention "
                                 "does not apply")
        if getattr(module, "is_causal", True) is False or kwargs.get("is_causal") is False:
            self.problems.append(f"{name} attends bidirectionally; the paged cache serves causal attention only")
        if kwargs.get("s_aux") is not None:
            self.problems.append(f"{name} uses attention sinks, which tokenmill's attention backends do not take")
        head_dim = query.shape[-1]
        if key.shape[-1] != head_dim or value.shape[-1] != head_dim:
            self.problems.append(f"{name}: query, key and value head sizes differ ({head_dim}, {key.shape[-1]}, "
                                 f"{value.shape[-1]})")
        # Most modules pass their window; some only keep it as an attribute and leave it to the mask.
        window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
        self.layers[layer] = LayerAttention(
            num_heads=query.shape[1], num_kv_heads=key.shape[1], head_dim=head_dim,
            scale=float(head_dim**-0.5 if scaling is None else scaling),
            sliding_window=int(window) if window is not None and window > 0 else None,
            softcap=float(kwargs["softcap"]) if kwargs.get("softcap") else None)


_ACTIVE_PROBE: contextvars.ContextVar[_Probe | None] = contextvars.ContextVar("tokenmill_probe", default=None)


def paged_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature over tokenmill's paged cache.

    query (1, H, T, D), key and value (1, K, T, D) -> ((1, T, H, D), no attention weights). The scale,
    window and soft cap the module passes were fixed per layer by the probe, in the layer's `AttentionSpec`.
    """
    step = kwargs.pop(STEP_KWARG, None)
    probe = _ACTIVE_PROBE.get()
    if probe is not None:
        if step is not probe:
            probe.problems.append(f"{type(module).__name__} is not handed the keyword arguments the model was called "
                                  "with, so the step's cache cannot reach it")
        probe.record(module, query, key, value, attention_mask, scaling, kwargs)
        return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3]), None
    if not isinstance(step, PagedStep):
        raise RuntimeError(f"attention implementation {ATTENTION_NAME!r} runs only inside tokenmill's engine step")
    layer = module.layer_idx
    # (1, H, T, D) -> (T, H, D): the backends take the flattened batch's rows.
    q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))
    out = step.backends[layer].forward(q, k, v, step.kv_caches[layer], step.metadata)
    return out.unsqueeze(0), None


@functools.cache
def register_attention() -> None:
    """Put `paged_attention` in transformers' registry under `ATTENTION_NAME`; done once, when a fallback model
    is first built rather than at import: importing transformers' modeling code takes seconds that serving
    a model of tokenmill's own does not need to pay."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, paged_attention)


# ---- which architectures the fallback takes ----------------------------------------------------


def causal_lm_class(config: Any) -> type:
    """transformers' causal-LM class for `config`; raises `UnsupportedArchitectureError` saying why the fallback
    cannot run it."""
    from transformers import PretrainedConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if not isinstance(config, PretrainedConfig):
        raise refused("the config is not a transformers configuration")
    if getattr(config, "is_encoder_decoder", False):
        raise refused(f"{config.model_type} is an encoder-decoder; the fallback serves decoder-only models")
    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise refused(f"transformers has no causal-LM class for model type {config.model_type!r}") from None
    if getattr(model_class, "_is_stateful", False):
        raise refused(f"{model_class.__name__} keeps recurrent or state-space state besides attention, which the "
                      "paged KV cache does not hold")
    other_layers = set(getattr(config, "layer_types", None) or ()) - ATTENTION_LAYER_TYPES
    if other_layers & RECURRENT_LAYER_TYPES:  # transformers 5.25 dropped `_is_stateful`; Mamba says this instead
        raise refused(f"it has {', '.join(sorted(other_layers))} layers, which keep recurrent or state-space state "
                      "that the paged KV cache does not hold")
    if other_layers:
        raise refused(f"it has {', '.join(sorted(other_layers))} layers; the paged cache serves full and "
                      "sliding-window attention")
    if rope_depends_on_length(config):
        # transformers computes it from the forward's longest position; the fallback's forward is the whole
        # flat batch, so each sequence's rotation would depend on what it is batched with.
        raise refused(f"its RoPE scaling ({rope_parameters(config)['rope_type']}) depends on the sequence's length, "
                      "which transformers computes over the whole batch")
    if getattr(config, "attention_chunk_size", None):
        raise refused("it attends within chunks (chunked local attention), which tokenmill's attention backends "
                      "do not do")
    if not model_class.is_backend_compatible():
        raise refused(f"{model_class.__name__}'s transformers code does not route attention through the attention "
                      "interface (_supports_attention_backend is False), so the paged cache cannot be plugged in")
    return model_class


def _meta_model(config: Any, dtype: torch.dtype, **options: Any) -> nn.Module:
    """The transformers model with our attention, built on the meta device: shapes only, no memory."""
    from transformers import AutoModelForCausalLM

    register_attention()
    causal_lm_class(config)
    config = config.__class__.from_dict(config.to_dict())  # a copy: setting the attention leaves the caller's alone
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=ATTENTION_NAME, **options)
    return model.eval()


@functools.lru_cache(maxsize=8)
def _probe(config_json: str, config_class: type) -> tuple[LayerAttention, ...]:
    config = config_class.from_dict(json.loads(config_json))
    # In bfloat16 with transformers' default experts kernel, which traces on the meta device where the
    # experts loop (data-dependent token selection) cannot; neither changes what attention is called with.
    model = _meta_model(config, torch.bfloat16)
    probe = _Probe()
    token = _ACTIVE_PROBE.set(probe)
    try:
        ids = torch.zeros(1, 2, dtype=torch.long, device="meta")
        positions = torch.arange(2, device="meta").unsqueeze(0)
        model.base_model(input_ids=ids, position_ids=positions, use_cache=False, **{STEP_KWARG: probe})
    except Exception as exc:  # noqa: BLE001 - whatever stops the trace, the fallback cannot run the model
        raise refused(f"its forward could not be traced on the meta device to find its attention layers "
                      f"({type(exc).__name__}: {exc})") from exc
    finally:
        _ACTIVE_PROBE.reset(token)
    num_layers = config.num_hidden_layers
    silent = sorted(set(range(num_layers)) - set(probe.layers))
    if silent:
        probe.problems.append(f"layers {silent} never call the attention interface (recurrent, convolutional or "
                              "linear-attention layers), and their state has no place in the paged cache")
    if probe.problems:
        raise refused("; ".join(dict.fromkeys(probe.problems)))
    layers = tuple(probe.layers[i] for i in range(num_layers))
    layer_types = getattr(config, "layer_types", None) or ()
    unwindowed = [i for i, kind in enumerate(layer_types) if kind == "sliding_attention" and
                  layers[i].sliding_window is None]
    if unwindowed:
        raise refused(f"layers {unwindowed} are sliding-window layers that do not tell attention their window")
    shapes = {(layer.num_kv_heads, layer.head_dim) for layer in layers}
    if len(shapes) > 1:
        raise refused(f"its layers cache keys of different shapes (kv heads, head size) {sorted(shapes)}; the "
                      "paged cache has one shape for every layer")
    return layers


def probe_attention(config: Any) -> tuple[LayerAttention, ...]:
    """Each layer's attention, learned from one meta-device forward (cached per config); raises
    `UnsupportedArchitectureError` naming what the fallback cannot run."""
    causal_lm_class(config)
    return _probe(config.to_json_string(use_diff=False), type(config))


def kv_cache_shape(config: Any, dtype: torch.dtype, parallel: ParallelContext = SINGLE_RANK) -> KVCacheShape:
    """What the fallback caches per token and layer, from the probed attention of its layers."""
    layers = probe_attention(config)
    return KVCacheShape(len(layers), layers[0].num_kv_heads, layers[0].head_dim, dtype)


# ---- the model ------------------------------------------------------------------------------------------------


class TransformersCausalLM(nn.Module):
    """A transformers causal LM on tokenmill's paged cache: the engine's model interface over transformers' code.

    Built with the model on the meta device; `load_weights` loads the checkpoint through transformers' own
    state-dict loading (its key renames, prefixes and tied weights). Runs on one rank only.
    """

    implementation = "transformers"

    def __init__(self, config: Any, make_attention: Callable[[AttentionSpec], AttentionBackend], dtype: torch.dtype,
                 parallel: ParallelContext = SINGLE_RANK):
        super().__init__()
        if parallel.is_parallel:
            raise refused(f"it runs on one rank, and {config.architectures[0]} has no tokenmill implementation to "
                          "shard: run it with one shard")
        self.config = config
        self.dtype = dtype
        layers = probe_attention(config)
        # One backend per distinct spec, shared by its layers as in our own models (the engine prepares each
        # once a step). A plain list, not submodules: the registered function reaches it through the step.
        specs = [layer.spec(dtype) for layer in layers]
        backends = {spec: make_attention(spec) for spec in dict.fromkeys(specs)}
        self.layer_attention = [backends[spec] for spec in specs]
        self.hf = _meta_model(config, dtype, experts_implementation=EXPERTS)  # weights come with load_weights

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                metadata: AttentionMetadata) -> torch.Tensor:
        step = PagedStep(self.layer_attention, kv_caches, metadata)
        out = self.hf.base_model(input_ids=input_ids.unsqueeze(0), position_ids=positions.unsqueeze(0),
                                 use_cache=False, **{STEP_KWARG: step})
        return out.last_hidden_state[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.hf.get_output_embeddings()(hidden).float()

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load the checkpoint through transformers' `from_pretrained` state-dict path; the tensors' dtype stays."""
        device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
        model, info = type(self.hf).from_pretrained(
            None, config=self.hf.config, state_dict=tensors, dtype=self.dtype, device_map={"": device},
            attn_implementation=ATTENTION_NAME, experts_implementation=EXPERTS, output_loading_info=True)
        missing = sorted(info["missing_keys"])
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} tensors, e.g. {', '.join(missing[:5])}")
        if info["mismatched_keys"]:
            raise ValueError(f"checkpoint tensors of the wrong shape: {sorted(info['mismatched_keys'])[:5]}")
        if info["unexpected_keys"]:  # transformers drops them too (extra heads, stale buffers)
            logger.warning("the checkpoint's %d tensors the model does not use are ignored, e.g. %s",
                           len(info["unexpected_keys"]), ", ".join(sorted(info["unexpected_keys"])[:5]))
        self.hf = model.eval()
        check_logits_are_the_head(self.hf)

    def load_ggml_weights(self, weights: dict) -> None:
        """Nothing to do: transformers' linear layers run the dequantized weights `load_weights` loaded."""


def check_logits_are_the_head(model: nn.Module) -> None:
    """Refuse a causal LM whose logits are more than its output embedding applied to its base model's output
    (a scaled hidden state, a soft cap, a logit scale), since `forward` and `compute_logits` do just that.

    Two tokens go through the base model and through the whole causal LM (attention in probe mode: zeros): the
    head must see the base model's output, and what the head returns, replaced by planted small integers
    (exact in every dtype), must come back as the logits.
    """
    head = model.get_output_embeddings()
    seen: dict[str, torch.Tensor] = {}

    def head_input(module, args):
        seen["head_input"] = args[0]

    def plant_logits(module, args, output):
        seen["logits"] = (torch.arange(output.numel(), device=output.device) % 61 - 30).to(output.dtype)
        return seen["logits"].reshape(output.shape)

    device = head.weight.device
    probe = _Probe()  # the attention records into it and returns zeros
    inputs = dict(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device),
                  position_ids=torch.arange(2, device=device).unsqueeze(0), use_cache=False, **{STEP_KWARG: probe})
    hooks = [head.register_forward_pre_hook(head_input), head.register_forward_hook(plant_logits)]
    token = _ACTIVE_PROBE.set(probe)
    try:
        with torch.no_grad():
            hidden = model.base_model(**inputs).last_hidden_state
            logits = model(**inputs).logits
    finally:
        _ACTIVE_PROBE.reset(token)
        for hook in hooks:
            hook.remove()
    name = type(model).__name__
    if "logits" not in seen:
        raise refused(f"{name} does not compute its logits with its output embedding module")
    if not torch.allclose(seen["head_input"], hidden, rtol=1e-5, atol=1e-6, equal_nan=True):
        raise refused(f"{name} changes the hidden states between its base model and its head")
    if not torch.equal(logits.flatten().to(seen["logits"].dtype), seen["logits"]):
        raise refused(f"{name} post-processes its logits (a soft cap or logit scale)")

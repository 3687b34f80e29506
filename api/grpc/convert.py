"""Engine objects <-> internal protocol messages, both ways, field for field."""

from __future__ import annotations

import dataclasses

from tokenmill.api.grpc import model_server_pb2 as pb
from tokenmill.grammar import GrammarSpec
from tokenmill.multimodal import ImageInput
from tokenmill.outputs import RequestOutput, TokenInfo
from tokenmill.sampling_params import SamplingParams
from tokenmill.speculate import SpeculationStats

_OPTIONAL_PARAMS = ("temperature", "seed")


def params_to_pb(params: SamplingParams) -> pb.SamplingParams:
    fields = {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}
    fields["logit_bias"] = dict(params.logit_bias)  # a map on the wire, (id, bias) pairs in SamplingParams
    grammar = fields.pop("grammar")
    if grammar is not None:
        fields["grammar_kind"], fields["grammar_value"] = grammar.kind, grammar.value
    message = pb.SamplingParams(**{k: v for k, v in fields.items() if k not in _OPTIONAL_PARAMS})
    for name in _OPTIONAL_PARAMS:
        if fields[name] is not None:
            setattr(message, name, fields[name])
    return message


def params_from_pb(message: pb.SamplingParams) -> SamplingParams:
    kwargs = {}
    for f in dataclasses.fields(SamplingParams):
        value = getattr(message, f.name, None)
        if f.name in _OPTIONAL_PARAMS:
            value = value if message.HasField(f.name) else None
        elif f.name == "grammar":
            value = GrammarSpec(message.grammar_kind, message.grammar_value) if message.grammar_kind else None
        elif f.name == "logit_bias":
            value = tuple(sorted(value.items()))
        elif isinstance(value, (list, tuple)) or hasattr(value, "extend"):
            value = tuple(value)
        kwargs[f.name] = value
    return SamplingParams(**kwargs)


def images_to_pb(images) -> list[pb.Image]:
    return [pb.Image(data=image.data, num_tokens=image.num_tokens) for image in images]


def images_from_pb(messages) -> list[ImageInput]:
    return [ImageInput(message.data, message.num_tokens) for message in messages]


def speculation_to_pb(stats: SpeculationStats) -> pb.SpeculationStats:
    return pb.SpeculationStats(**dataclasses.asdict(stats))


def speculation_from_pb(message: pb.SpeculationStats) -> SpeculationStats:
    return SpeculationStats(**{f.name: (list if f.name == "accepted_per_position" else int)(getattr(message, f.name))
                               for f in dataclasses.fields(SpeculationStats)})


def token_to_pb(token: TokenInfo) -> pb.TokenInfo:
    message = pb.TokenInfo(id=token.id, text=token.text, special=token.special)
    if token.logprob is not None:
        message.logprob = token.logprob
    return message


def token_from_pb(message: pb.TokenInfo) -> TokenInfo:
    return TokenInfo(message.id, message.logprob if message.HasField("logprob") else None, message.text,
                     message.special)


def output_to_pb(out: RequestOutput) -> pb.EngineOutput:
    message = pb.EngineOutput(
        new_tokens=[token_to_pb(t) for t in out.new_tokens],
        new_top_tokens=[pb.TokenList(tokens=[token_to_pb(t) for t in step]) for step in out.new_top_tokens],
        text_delta=out.text_delta, finished=out.finished, num_prompt_tokens=out.num_prompt_tokens,
        num_generated_tokens=out.num_generated_tokens, num_cached_tokens=out.num_cached_tokens,
        has_prompt_logprobs=out.prompt_logprobs is not None,
        prompt_logprobs=[token_to_pb(t) for t in out.prompt_logprobs or []],
        cumulative_logprob=out.cumulative_logprob,
    )
    for name in ("finish_reason", "error", "generated_text", "seed", "queue_time_s", "inference_time_s",
                 "prefill_time_s"):
        value = getattr(out, name)
        if value is not None:
            setattr(message, name, value)
    return message


def output_from_pb(request_id: str, message: pb.EngineOutput) -> RequestOutput:
    def opt(name):
        return getattr(message, name) if message.HasField(name) else None

    return RequestOutput(
        request_id=request_id,
        new_tokens=[token_from_pb(t) for t in message.new_tokens],
        new_top_tokens=[[token_from_pb(t) for t in step.tokens] for step in message.new_top_tokens],
        text_delta=message.text_delta, finished=message.finished, finish_reason=opt("finish_reason"),
        error=opt("error"), num_prompt_tokens=message.num_prompt_tokens,
        num_generated_tokens=message.num_generated_tokens, num_cached_tokens=message.num_cached_tokens,
        prompt_logprobs=[token_from_pb(t) for t in message.prompt_logprobs] if message.has_prompt_logprobs else None,
        generated_text=opt("generated_text"), cumulative_logprob=message.cumulative_logprob, seed=opt("seed"),
        queue_time_s=opt("queue_time_s"), inference_time_s=opt("inference_time_s"),
        prefill_time_s=opt("prefill_time_s"),
    )

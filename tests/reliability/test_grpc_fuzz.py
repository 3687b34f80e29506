"""Random and corrupted messages on the public gRPC API: bad input is INVALID_ARGUMENT (or
RESOURCE_EXHAUSTED under load), never INTERNAL or UNKNOWN; the server keeps answering and leaks no block.

Bounded: `MAX_EXAMPLES` messages per strategy, a server whose `max_total_tokens` keeps every
generation short, and a deadline on every call.
"""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.reliability.conftest import TinyServer, assert_drained
from tokenmill.api.grpc import generate_pb2 as pb
from tokenmill.api.grpc import generate_pb2_grpc as pb_grpc

MAX_EXAMPLES = 60
ACCEPTABLE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ = settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
                phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))

uint32 = st.integers(0, 2**32 - 1)
floats = st.floats(width=32)  # NaN, infinities, subnormals and signed zeros included
small_text = st.text(max_size=40)


def _optional(strategy):
    return st.one_of(st.none(), strategy)


@st.composite
def requests(draw) -> pb.GenerateRequest:
    """Half wild (any value of each field's wire type), half within range, so both sides of validation run."""
    wild = draw(st.booleans())
    unit = floats if wild else st.floats(0.05, 0.95)
    count = uint32 if wild else st.integers(1, 8)
    fields = {
        "temperature": draw(_optional(unit)), "top_k": draw(_optional(uint32)), "top_p": draw(_optional(unit)),
        "typical_p": draw(_optional(unit)), "repetition_penalty": draw(_optional(unit)),
        "frequency_penalty": draw(_optional(unit)), "seed": draw(_optional(st.integers(0, 2**64 - 1))),
        "max_new_tokens": draw(_optional(count)), "truncate": draw(_optional(count)),
    }
    parameters = pb.Parameters(**{k: v for k, v in fields.items() if v is not None},
                               stop=draw(st.lists(small_text, max_size=6 if wild else 2)),
                               do_sample=draw(st.booleans()), top_n_tokens=draw(count if wild else st.integers(0, 5)),
                               decoder_input_details=draw(st.booleans()))
    inputs = draw(st.one_of(small_text, st.lists(st.sampled_from(["w5", "w6", "w7"]), max_size=20).map(" ".join)))
    return pb.GenerateRequest(inputs=inputs, parameters=parameters)


@pytest.fixture(scope="module")
def server():
    server = TinyServer(max_concurrent_requests=4, max_total_tokens=64)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.grpc_address) as channel:
        yield channel


def _status(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def _assert_still_serving(server, channel) -> None:
    stub = pb_grpc.TextGenerationStub(channel)
    reply = stub.Generate(pb.GenerateRequest(inputs="w5 w6", parameters=pb.Parameters(max_new_tokens=3)), timeout=30)
    assert reply.generated_tokens == 3
    assert stub.ModelInfo(pb.ModelInfoRequest(), timeout=30).model_id == "tiny-llama"
    assert_drained(server)


@pytest.mark.timeout(300)
def test_random_generate_requests(server, channel) -> None:
    stub = pb_grpc.TextGenerationStub(channel)
    seen: dict[str, set[str]] = {"Generate": set(), "GenerateStream": set()}

    @given(request=requests(), streaming=st.booleans())
    @FUZZ
    def fuzz(request, streaming) -> None:
        if streaming:
            code = _status(lambda: list(stub.GenerateStream(request, timeout=30)))
        else:
            code = _status(lambda: stub.Generate(request, timeout=30))
        assert code in ACCEPTABLE, (code, request)
        seen["GenerateStream" if streaming else "Generate"].add(code.name)

    fuzz()
    # The strategy reaches both sides of validation on both methods, or it proves little.
    assert seen["Generate"] >= {"OK", "INVALID_ARGUMENT"} and seen["GenerateStream"] >= {"OK", "INVALID_ARGUMENT"}, seen
    _assert_still_serving(server, channel)


@pytest.mark.timeout(300)
def test_corrupted_messages_on_every_method(server, channel) -> None:
    """Valid messages with bytes flipped, cut or appended: undecodable ones are INVALID_ARGUMENT."""
    methods = [method.name for method in pb.DESCRIPTOR.services_by_name["TextGeneration"].methods]
    raw = {name: channel.unary_stream(f"/tokenmill.v1.TextGeneration/{name}") if name == "GenerateStream"
           else channel.unary_unary(f"/tokenmill.v1.TextGeneration/{name}") for name in methods}
    seen: set[str] = set()

    @given(request=requests(), method=st.sampled_from(methods), cut=st.integers(0, 64),
           flips=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(1, 255)), max_size=4),
           tail=st.binary(max_size=8))
    @FUZZ
    def fuzz(request, method, cut, flips, tail) -> None:
        data = bytearray(request.SerializeToString())
        for position, mask in flips:
            if data:
                data[position % len(data)] ^= mask
        data = bytes(data[: max(0, len(data) - cut)] if cut < len(data) else data) + tail
        call = raw[method]
        code = _status(lambda: list(call(data, timeout=30)) if method == "GenerateStream" else call(data, timeout=30))
        assert code in ACCEPTABLE, (code, method, data)
        seen.add(code.name)

    fuzz()
    assert "INVALID_ARGUMENT" in seen, seen
    _assert_still_serving(server, channel)


def test_invalid_utf8_and_nan_are_invalid_argument(server, channel) -> None:
    """The inputs the fuzz first found answered UNKNOWN: a string field with bad UTF-8, a NaN float."""
    garbage = channel.unary_unary("/tokenmill.v1.TextGeneration/Tokenize")
    with pytest.raises(grpc.RpcError) as refused:
        garbage(b"\x0a\x02\xff\xfe", timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    stub = pb_grpc.TextGenerationStub(channel)
    with pytest.raises(grpc.RpcError) as refused:
        stub.Generate(pb.GenerateRequest(inputs="w5", parameters=pb.Parameters(temperature=float("nan"))), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "temperature" in refused.value.details()

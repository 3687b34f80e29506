"""Images over HTTP: OpenAI `image_url` parts and TGI's markdown images reach a tiny Idefics3 and give
transformers' greedy output; http(s) URLs are fetched within limits; text-only models refuse images."""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import threading

import httpx
import pytest

from tests.api.conftest import TinyServer
from tests.multimodal.tiny_vlm import CHAT_TEMPLATE, build_tiny_vlm, png
from tokenmill.api.images import ImageLimits, ImagePrompts
from tokenmill.conformance.ports import free_port
from tokenmill.errors import ValidationError
from tokenmill.multimodal import ImageInput
from tokenmill.sampling_params import SamplingParams

MAX_NEW = 5
EOS = 1


@pytest.fixture(scope="module")
def vlm():
    return build_tiny_vlm()


@pytest.fixture(scope="module")
def vlm_server(vlm):
    server = TinyServer(tiny=vlm, chat_template=CHAT_TEMPLATE, max_concurrent_requests=8, payload_limit=200_000)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def image_host():
    """A local HTTP server holding /a.png (png(7)); never the internet."""
    body = png(7)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/a.png" else 404)
            self.send_header("Content-Length", str(len(body) if self.path == "/a.png" else 0))
            self.end_headers()
            if self.path == "/a.png":
                self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _assert_greedy(got: list[int], expected: list[int]) -> None:
    """The server's tokens are transformers' greedy ones, up to where the server stopped at EOS."""
    assert got and got == expected[: len(got)], (got, expected)
    assert len(got) == len(expected) or got[-1] == EOS


def _chat(url: str, parts: list[dict]) -> dict:
    body = {"messages": [{"role": "user", "content": parts}], "max_tokens": MAX_NEW, "temperature": 0,
            "logprobs": True}
    return {"route": "/v1/chat/completions", "body": body, "url": url}


def _generate(url: str, inputs: str, route: str = "/generate") -> dict:
    body = {"inputs": inputs, "parameters": {"max_new_tokens": MAX_NEW, "details": True}}
    return {"route": route, "body": body, "url": url}


async def _post_all(server, calls: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=120) as client:
        return await asyncio.gather(*(client.post(f"{server.url}{c['route']}", json=c["body"]) for c in calls))


def _token_ids(server, response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [json.loads(line[5:]) for line in response.text.splitlines() if line.startswith("data:")]
        return [event["token"]["id"] for event in events]
    payload = response.json()
    if "choices" in payload:
        tokens = [t["token"] for t in payload["choices"][0]["logprobs"]["content"]]
        return server.engine.tokenizer.convert_tokens_to_ids(tokens)
    return [t["id"] for t in payload["details"]["tokens"]]


def test_chat_and_generate_with_one_and_two_images_match_transformers(vlm_server, vlm, image_host) -> None:
    one, two, fetched = [png(1)], [png(2), png(3, (50, 30))], [png(7)]
    chat_prompt = "user: {} <end_of_utterance> assistant: "
    cases = [  # (request, prompt text as the model sees it, images)
        (_chat("", [{"type": "text", "text": "w5 "}, {"type": "image_url", "image_url": {"url": data_url(one[0])}}]),
         chat_prompt.format("w5 <image>"), one),
        (_chat("", [{"type": "image_url", "image_url": {"url": data_url(two[0])}}, {"type": "text", "text": " w6 w7 "},
                    {"type": "image_url", "image_url": {"url": data_url(two[1])}}]),
         chat_prompt.format("<image> w6 w7 <image>"), two),
        (_chat("", [{"type": "text", "text": "w8 "}, {"type": "image_url", "image_url": {"url": f"{image_host}/a.png"}}]),
         chat_prompt.format("w8 <image>"), fetched),
        (_generate("", f"w9 ![]({data_url(one[0])}) w20"), "w9 <image> w20", one),
        (_generate("", f"![a]({data_url(two[0])}) w21 ![b]({data_url(two[1])})"), "<image> w21 <image>", two),
        (_generate("", f"w22 ![]({data_url(one[0])})", "/generate_stream"), "w22 <image>", one),
    ]
    responses = asyncio.run(_post_all(vlm_server, [call for call, _, _ in cases]))  # served concurrently
    for response, (_, text, images) in zip(responses, cases):
        _, expected = vlm.greedy(text, images, MAX_NEW)
        _assert_greedy(_token_ids(vlm_server, response), expected)


def test_refusals_name_what_was_wrong(vlm_server, image_host) -> None:
    cases = [
        (_chat("", [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]), "cannot be read"),
        (_chat("", [{"type": "image_url", "image_url": {"url": f"{image_host}/missing.png"}}]), "HTTP 404"),
        (_chat("", [{"type": "image_url", "image_url": {"url": "ftp://host/a.png"}}]), "data URL or an http(s) URL"),
        (_chat("", [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]), "input_audio"),
    ]
    for response, (_, reason) in zip(asyncio.run(_post_all(vlm_server, [c for c, _ in cases])), cases):
        assert response.status_code == 422 and reason in response.json()["error"], response.text


def test_image_urls_obey_the_flag_and_the_limits(vlm, image_host) -> None:
    processor = vlm.processor
    url = f"{image_host}/a.png"
    with pytest.raises(ValidationError, match="--disable-image-urls"):
        asyncio.run(ImagePrompts(processor, ImageLimits(allow_urls=False)).read(url, "x"))
    with pytest.raises(ValidationError, match="100-byte limit"):
        asyncio.run(ImagePrompts(processor, ImageLimits(max_bytes=100)).read(url, "x"))
    with pytest.raises(ValidationError, match="100-byte limit"):
        asyncio.run(ImagePrompts(processor, ImageLimits(max_bytes=100)).read(data_url(png(7)), "x"))
    assert asyncio.run(ImagePrompts(processor).read(url, "x")) == png(7)


def test_an_image_sent_to_a_text_only_model_is_refused() -> None:
    server = TinyServer(max_concurrent_requests=2)
    try:
        chat = _chat("", [{"type": "text", "text": "w5"}, {"type": "image_url", "image_url": {"url": data_url(png(1))}}])
        response = httpx.post(f"{server.url}{chat['route']}", json=chat["body"], timeout=60)
        assert response.status_code == 422 and "text-only" in response.json()["error"]
        with pytest.raises(ValidationError, match="text-only"):  # what a router's request meets on the replica
            server.engine.add_request("r", [5, 6], SamplingParams(max_new_tokens=2), images=[ImageInput(png(1), 1)])
    finally:
        server.stop()


def test_images_cross_the_model_server_protocol() -> None:
    from tokenmill.api.grpc import model_server_pb2 as pb
    from tokenmill.api.grpc.convert import images_from_pb, images_to_pb

    images = [ImageInput(png(1), 4), ImageInput(b"\x00\xff", 8)]
    wire = pb.EngineRequest(images=images_to_pb(images)).SerializeToString()
    crossed = images_from_pb(pb.EngineRequest.FromString(wire).images)
    assert crossed == images and crossed[0].content_hash == images[0].content_hash


def test_images_reach_a_model_server_through_the_router(vlm, tmp_path) -> None:
    """A saved SmolVLM-shaped folder: its processor read as the router reads it, the engine loaded from it
    behind the internal gRPC protocol, the images sent through `ReplicaRouter`."""
    from tests.reliability.conftest import model_server
    from tokenmill.api.router import ReplicaRouter
    from tokenmill.engine import Engine, EngineConfig
    from tokenmill.loader import load_processor

    vlm.reference.save_pretrained(tmp_path)
    vlm.processor.save_pretrained(tmp_path)
    engine = Engine(EngineConfig(model_id=str(tmp_path), backend="cpu", dtype="float32", kv_cache_bytes=4 << 20,
                                 progress=False))
    ids, images = ImagePrompts(load_processor(str(tmp_path))).encode("w9 <image> w20 <image>", [png(1), png(2)])

    async def generate() -> list[int]:
        async with model_server(engine) as (address, _):
            router = ReplicaRouter([address])
            await router.wait_ready(30)
            try:
                params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
                return [t.id async for out in router.generate("r", ids, params, None, images) for t in out.new_tokens]
            finally:
                await router.stop()

    prompt, expected = vlm.greedy("w9 <image> w20 <image>", [png(1), png(2)], MAX_NEW)
    assert ids == prompt and asyncio.run(generate()) == expected


def test_the_router_hashes_a_prompts_images_as_the_engine_does(vlm) -> None:
    """Prefix-aware routing keys an image prompt by the images' content, with the engine's own block hashes."""
    from tokenmill.api.grpc import model_server_pb2 as pb
    from tokenmill.api.router import ReplicaRouter
    from tokenmill.block_manager import prompt_block_hashes
    from tokenmill.multimodal import image_block_keys, place_images

    text = "w5 w6 w7 w8 w9 w20 w21 w22 w23 w24 <image> w25 w26 w27 w28"
    first_ids, first = ImagePrompts(vlm.processor).encode(text, [png(1)])
    other_ids, other = ImagePrompts(vlm.processor).encode(text, [png(2)])

    async def hashes() -> tuple[list[bytes], list[bytes], list[bytes]]:
        router = ReplicaRouter(("127.0.0.1:9", "127.0.0.1:7"))
        for replica in router.replicas:
            replica.healthy, replica.info = True, pb.InfoResponse(ready=True, prefix_cache_block_size=4)
        try:
            unknown = router.prefix_hashes(first_ids, None, first)  # no image token known: routed by load
            router.image_token_id = vlm.config.image_token_id
            return unknown, router.prefix_hashes(first_ids, None, first), router.prefix_hashes(other_ids, None, other)
        finally:
            await router.stop()

    unknown, routed, routed_other = asyncio.run(hashes())
    keys = image_block_keys(place_images(first_ids, vlm.config.image_token_id, first))
    assert unknown == [] and routed == list(prompt_block_hashes(first_ids, 4, image_keys=keys))
    # The same token ids up to the image's block, other hashes from there on.
    assert first_ids == other_ids and routed[:3] == routed_other[:3] and routed[3:] != routed_other[3:]

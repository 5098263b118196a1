"""Media in chat completions through the official ``openai`` client, against a real gateway in front
of the real mesh on the tiny bundle: ``image_url.detail`` picks the vision budget and
``video_url`` adds the sampled frames with their mm:ss timestamps. The prompt sizes are compared
with the decoder's prompt builder given what the vision encoder reports for the same bytes.
"""

from __future__ import annotations

import base64
import io
import subprocess
from pathlib import Path

import grpc
import openai
import pytest
from PIL import Image
from skimage import data as skdata

from gemma_mesh.gateway.settings import GatewaySettings
from gemma_mesh.proto.v1 import vision_pb2, vision_pb2_grpc

MODEL = GatewaySettings().served_model_name
QUESTION = {"type": "text", "text": "What happens?"}


@pytest.fixture(scope="module")
def client(gateway_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway_url + "/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def vision(backends):
    channel = grpc.insecure_channel(backends.vision)
    yield vision_pb2_grpc.VisionEncoderStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> bytes:
    """A 2 s, 10 fps MP4 (ffmpeg's test pattern)."""
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    pattern = "testsrc=duration=2:size=160x120:rate=10"
    subprocess.run(
        [
            "ffmpeg",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            pattern,
            "-pix_fmt",
            "yuv420p",
            str(path),
        ],
        check=True,
    )
    return Path(path).read_bytes()


def _prompt_tokens(client: openai.OpenAI, content: list[dict]) -> int:
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=1
    )
    return response.usage.prompt_tokens


def _image(detail: str) -> dict:
    buf = io.BytesIO()
    Image.fromarray(skdata.astronaut()).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return {"type": "image_url", "image_url": {"url": url, "detail": detail}}


def test_image_detail_picks_the_vision_budget(client: openai.OpenAI, vision) -> None:
    described = vision.Describe(vision_pb2.DescribeRequest(), timeout=30)
    budgets = sorted(described.supported_soft_tokens)
    image = base64.b64decode(_image("auto")["image_url"]["url"].partition(",")[2])

    def tokens(budget: int) -> int:  # what the encoder gives the image at ``budget`` (0 = default)
        request = vision_pb2.EncodeImageRequest(
            image=vision_pb2.ImageInput(encoded=image, max_soft_tokens=budget)
        )
        return vision.Encode(request, timeout=60).num_soft_tokens

    auto = _prompt_tokens(client, [_image("auto"), QUESTION])
    low = _prompt_tokens(client, [_image("low"), QUESTION])
    high = _prompt_tokens(client, [_image("high"), QUESTION])
    assert low - auto == tokens(budgets[0]) - tokens(0) < 0
    assert high - auto == tokens(budgets[-1]) - tokens(0) > 0


def test_a_video_adds_its_frames_with_timestamps(
    client: openai.OpenAI, vision, tiny_bundle, clip: bytes
) -> None:
    url = "data:video/mp4;base64," + base64.b64encode(clip).decode()
    got = _prompt_tokens(client, [{"type": "video_url", "video_url": {"url": url}}, QUESTION])
    frames = vision.EncodeVideo(vision_pb2.EncodeVideoRequest(data=clip), timeout=60).frames
    assert len(frames) > 1
    expected = tiny_bundle.prompt_builder.build(
        [{"role": "user", "content": [{"type": "video"}, QUESTION]}],
        video_frames=[[(f.timestamp_s, f.num_soft_tokens) for f in frames]],
    )
    assert got == expected.input_ids.shape[0]
    assert "00:01 " in expected.text  # frames after the first second are stamped mm:ss


@pytest.mark.parametrize(
    ("part", "param", "needle"),
    [
        (
            {"type": "video_url", "video_url": {"url": "data:image/png;base64,AAAA"}},
            "messages.0.content.0.video_url.url",
            "not a video",
        ),
        (
            {"type": "video_url", "video_url": {"url": "https://example.com/a.mp4"}},
            "messages.0.content.0.video_url.url",
            "remote video URLs",
        ),
        (
            {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}},
            "messages.0.content.0.video_url.url",
            "",
        ),
        (
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "max"}},
            "messages.0.content.0.image_url.detail",
            "",
        ),
    ],
)
def test_bad_media_are_400s_naming_the_part(
    client: openai.OpenAI, part: dict, param: str, needle: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        _prompt_tokens(client, [part, QUESTION])
    assert info.value.body["param"] == param and needle in info.value.body["message"], info.value.body


def test_videos_over_the_limit_are_refused(client: openai.OpenAI, clip: bytes) -> None:
    video = {
        "type": "video_url",
        "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(clip).decode()},
    }
    with pytest.raises(openai.BadRequestError) as info:
        _prompt_tokens(client, [video, video, QUESTION])
    assert "(max_videos_per_request)" in info.value.body["message"]

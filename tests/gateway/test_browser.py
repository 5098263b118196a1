"""The browser page end to end: headless Chromium (Debian's ``chromium``) with a fake microphone
playing real LibriVox speech and a fake camera showing a real photo, against a real gateway and the
real gRPC services on the tiny random-weight bundle.

The tiny model's captions are random-looking text, so the tests check that captions (partial and
final, committed and tentative), frame analyses and the connection state render, never words.
Screenshots go to ``$GEMMA_MESH_ARTIFACTS`` (or the test's tmp dir); their paths are printed.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.gateway.media import fake_camera_y4m, fake_microphone_wav

CHROMIUM = Path("/usr/bin/chromium")
RENDER_TIMEOUT_MS = 90_000
VIEWPORT = {"width": 1400, "height": 900}

# Records how committed and tentative caption text is styled whenever a partial renders (the text of
# a live line changes too fast to catch by polling).
STYLE_RECORDER = """
window.__captionStyles = [];
new MutationObserver(() => {
  for (const line of document.querySelectorAll('[data-testid=caption-segment][data-final=false]')) {
    const committed = line.querySelector('.committed'), tentative = line.querySelector('.tentative');
    const style = (el) => el && el.textContent.trim()
      ? {text: el.textContent, fontStyle: getComputedStyle(el).fontStyle, color: getComputedStyle(el).color}
      : null;
    const seen = {segment: line.dataset.segmentId, committed: style(committed), tentative: style(tentative)};
    if ((seen.committed || seen.tentative) && window.__captionStyles.length < 500) window.__captionStyles.push(seen);
  }
}).observe(document, {subtree: true, childList: true, characterData: true});
"""

FINAL_RENDERED = """() => [...document.querySelectorAll('[data-testid=caption-segment][data-final=true]')]
  .some((line) => line.querySelector('[data-testid=caption-final]').textContent.trim().length > 0)"""
ANALYSIS_DONE = """() => [...document.querySelectorAll('[data-testid=analysis-item][data-done=true]')]
  .some((item) => item.querySelector('[data-testid=analysis-text]').textContent.trim().length > 0)"""
PAGE_STATE = """() => ({state: gemmaMesh.state, sessionId: gemmaMesh.sessionId, eventIds: gemmaMesh.eventIds,
  duplicates: gemmaMesh.duplicates, gaps: gemmaMesh.gaps, started: gemmaMesh.started, counts: gemmaMesh.counts,
  audio: gemmaMesh.audio, log: [...document.querySelectorAll('#log li')].map((li) => li.textContent)})"""


@pytest.fixture(scope="module")
def fake_media(librivox_clips: list[Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(WAV, Y4M): two LibriVox clips, each followed by a second of silence (Chromium loops the file,
    so segments keep closing on silence); the astronaut photo as a camera."""
    out = tmp_path_factory.mktemp("browser-media")
    wav = fake_microphone_wav([librivox_clips[1], librivox_clips[4]], out / "microphone.wav")
    y4m = fake_camera_y4m(out / "camera.y4m")
    return wav, y4m


@pytest.fixture(scope="module")
def browser(fake_media: tuple[Path, Path]) -> Iterator[Browser]:
    assert CHROMIUM.exists(), "Debian's chromium is not installed (apt-get install chromium)"
    wav, y4m = fake_media
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={wav}",
                f"--use-file-for-fake-video-capture={y4m}",
                "--autoplay-policy=no-user-gesture-required",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield browser
        browser.close()


@pytest.fixture
def artifacts_dir(tmp_path: Path) -> Path:
    configured = os.environ.get("GEMMA_MESH_ARTIFACTS")
    path = Path(configured) if configured else tmp_path
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class LivePage:
    """The page under test, the browser console it logged and where its screenshots go."""

    page: Page
    console: list[str]
    request: pytest.FixtureRequest
    artifacts_dir: Path

    def state(self) -> dict:
        return self.page.evaluate(PAGE_STATE)

    def wait_for(self, expression: str, what: str, timeout_ms: int = RENDER_TIMEOUT_MS) -> None:
        """Wait until the JS ``expression`` is truthy; on timeout fail with the page's state and console."""
        try:
            self.page.wait_for_function(expression, timeout=timeout_ms, polling=100)
        except Exception as error:  # re-raised with the page's state
            state = json.dumps(self.state(), indent=1)[-4000:]
            console = "\n".join(self.console[-30:])
            raise AssertionError(
                f"{what} within {timeout_ms} ms: {error}\npage state: {state}\nconsole:\n{console}"
            ) from None

    def start(self, *, camera: bool) -> None:
        self.page.get_by_label("Send camera frames").set_checked(camera)
        self.page.get_by_test_id("start-button").click()
        self.wait_for("() => gemmaMesh.state === 'live'", "the session went live", timeout_ms=30_000)

    def screenshot(self, label: str) -> Path:
        """Save a screenshot, print its path (also under -q) and attach it to the test's report."""
        shot = self.artifacts_dir / f"{self.request.node.name}-{label}.png"
        self.page.screenshot(path=str(shot), full_page=True)
        self.request.node.user_properties.append((f"screenshot-{label}", str(shot)))
        with self.request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
            print(f"\nscreenshot: {shot}")
        return shot


@pytest.fixture
def live(
    browser: Browser, gateway_url: str, request: pytest.FixtureRequest, artifacts_dir: Path
) -> Iterator[LivePage]:
    """The page at ``/`` in a fresh browser context; a screenshot is saved after the test whatever
    the outcome, then the session is stopped."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
    page.on("pageerror", lambda error: console.append(f"pageerror: {error}"))
    page.add_init_script(STYLE_RECORDER)
    page.goto(f"{gateway_url}/")
    live = LivePage(page, console, request, artifacts_dir)
    try:
        yield live
    finally:
        live.screenshot("end")
        with contextlib.suppress(Exception):  # must not hide the test's own failure
            page.evaluate("() => gemmaMesh.stop()")
        context.close()


def session_log(gateway_url: str, session_id: str) -> list[dict]:
    """The logged events of ``session_id`` (a resume from event 0), for failure messages."""
    from websockets.sync.client import connect

    events: list[dict] = []
    with connect(gateway_url.replace("http", "ws", 1) + "/v1/stream", open_timeout=10) as ws:
        ws.send(json.dumps({"type": "session.start", "session_id": session_id, "last_event_id": 0}))
        with contextlib.suppress(TimeoutError):
            while True:  # the replay, then this attachment's own events, until 3 s pass quietly
                events.append(json.loads(ws.recv(timeout=3)))
    return events


def assert_consecutive_ids(state: dict, gateway_url: str | None = None) -> None:
    ids = state["eventIds"]
    if ids != list(range(1, len(ids) + 1)) and gateway_url and state["sessionId"]:
        seen = set(ids)
        logged = [
            {
                k: e.get(k)
                for k in (
                    "event_id",
                    "type",
                    "segment_id",
                    "start_ms",
                    "end_ms",
                    "reason",
                    "resumed",
                    "audio_clock_ms",
                )
                if k in e
            }
            for e in session_log(gateway_url, state["sessionId"])
        ]
        missing = [e for e in logged if e["event_id"] not in seen and e["event_id"] <= max(ids)]
        raise AssertionError(f"event ids skipped or repeated: {ids}\nmissing: {missing}\nlog: {logged}")
    assert ids == list(range(1, len(ids) + 1)), f"event ids skipped or repeated: {ids}"
    assert state["duplicates"] == [], f"events received twice: {state['duplicates']}"
    assert state["gaps"] == [], f"events skipped: {state['gaps']}"


def test_page_renders_captions_and_frame_analysis(live: LivePage) -> None:
    page = live.page
    live.start(camera=True)
    live.wait_for(FINAL_RENDERED, "a final caption with text rendered")
    live.wait_for(ANALYSIS_DONE, "a completed frame analysis with text rendered")

    state = live.state()
    pill = page.get_by_test_id("connection-state")
    assert pill.get_attribute("data-state") == "live", state
    assert pill.inner_text().strip().lower() == "live"

    # Partials rendered on a live line before their finals: committed text plain, tentative grey italics.
    assert state["counts"]["partials"] >= 1, state["counts"]
    styles = page.evaluate("window.__captionStyles")
    assert styles, "no partial caption ever rendered on a live line"
    tentative = [s["tentative"] for s in styles if s["tentative"]]
    committed = [s["committed"] for s in styles if s["committed"]]
    assert tentative or committed
    for t in tentative:
        assert t["fontStyle"] == "italic", t
    for c in committed:
        assert c["fontStyle"] == "normal", c
    if tentative and committed:
        assert tentative[0]["color"] != committed[0]["color"]
    finals = page.locator("[data-testid=caption-segment][data-final=true]")
    assert finals.count() >= 1
    assert finals.first.locator("[data-testid=caption-tentative]").inner_text() == ""

    # Audio went through the worklet's resampler at 16 kHz and reached the gateway.
    audio = state["audio"]
    assert audio["capture"]["inputRateHz"] in (44100, 48000), audio
    assert audio["sentSamples"] > 16000, audio
    assert audio["sentSamples"] == audio["capturedSamples"], audio  # nothing captured is held back
    assert state["counts"]["errors"] == 0, state["log"]
    assert_consecutive_ids(state)

    live.screenshot("live")

    # Stop: session.end flushes, session.ended arrives, the page shows closed.
    page.get_by_test_id("stop-button").click()
    live.wait_for("() => gemmaMesh.state === 'closed'", "the session closed after Stop", timeout_ms=30_000)
    assert_consecutive_ids(live.state())


# The page's first retry comes after a 250-500 ms backoff; "at-once" reconnects immediately, while
# the gateway is still finishing the old attachment (its detach flush decodes the open segment): the
# session lease makes the resume wait for it, so the replay is complete and the state current.
@pytest.mark.parametrize("retry_in_ms", [pytest.param(None, id="backoff"), pytest.param(0, id="at-once")])
def test_page_resumes_after_a_dropped_connection(
    live: LivePage, gateway_url: str, retry_in_ms: int | None
) -> None:
    page = live.page
    live.start(camera=False)
    # Drop mid-sentence (a segment is open: partials rendered, no final yet): the hard case, where
    # the gateway must finish the old attachment's segment and the page must resend its audio.
    live.wait_for("() => gemmaMesh.counts.partials >= 1", "captions before the drop")
    live.wait_for(
        "() => !!document.querySelector('[data-testid=caption-segment][data-final=false]')",
        "an open caption segment",
    )
    before = live.state()
    session_id = before["sessionId"]

    page.evaluate("(retryInMs) => gemmaMesh.dropConnection({retryInMs: retryInMs ?? undefined})", retry_in_ms)
    live.wait_for(
        "() => gemmaMesh.started.some((s) => s.resumed) && gemmaMesh.state === 'live'",
        "a resumed session.started after the drop",
        timeout_ms=30_000,
    )
    finals_at_resume = live.state()["counts"]["finals"]
    # Captions keep coming on the resumed connection (audio resent from the gateway's audio clock).
    live.wait_for(f"() => gemmaMesh.counts.finals > {finals_at_resume}", "a final caption after the resume")

    after = live.state()
    assert after["sessionId"] == session_id
    resumed = [s for s in after["started"] if s["resumed"]]
    assert len(resumed) == 1 and len(after["started"]) == 2, after["started"]
    # Audio captured while the socket was down waited in the ring and was sent from the gateway's
    # audio clock on: the page is caught up again.
    assert 0 <= resumed[0]["audio_clock_ms"] <= resumed[0]["captured_ms"], resumed
    if retry_in_ms is None:  # 250-500 ms down: audio was captured meanwhile (an at-once resume
        # can finish within one capture quantum, so there it may have none to resend)
        assert resumed[0]["captured_ms"] > before["audio"]["sentSamples"] / 16, (resumed, before["audio"])
    else:
        assert resumed[0]["captured_ms"] >= before["audio"]["sentSamples"] / 16, (resumed, before["audio"])
    assert after["audio"]["sentSamples"] == after["audio"]["capturedSamples"], after["audio"]
    assert_consecutive_ids(after, gateway_url)
    assert len(after["eventIds"]) > len(before["eventIds"])
    assert page.get_by_test_id("stat-resumes").inner_text() == "1"
    assert page.get_by_test_id("connection-state").get_attribute("data-state") == "live"


def test_page_renders_translation(live: LivePage) -> None:
    page = live.page
    page.get_by_test_id("task-select").select_option("translate")
    target = page.get_by_test_id("target-language")
    assert target.is_enabled()
    target.fill("fr")
    live.start(camera=False)
    live.wait_for(
        """() => [...document.querySelectorAll('[data-testid=translation-segment][data-final=true]')]
          .some((line) => line.querySelector('[data-testid=translation-final]').textContent.trim().length > 0)""",
        "a final translation with text rendered",
    )
    state = live.state()
    assert state["counts"]["errors"] == 0, state["log"]
    assert "fr" in page.locator("#translation-lang").inner_text()
    assert page.locator("[data-testid=caption-segment]").count() == 0  # translate sends translation.* only
    live.screenshot("live")
    assert_consecutive_ids(state)


def test_page_uses_the_typed_api_key(browser: Browser, secured_gateway_url: str) -> None:
    """With authentication on, a wrong key ends in 'closed' with the error shown (no retry loop);
    the right key mints a token over HTTP and the session goes live."""
    context = browser.new_context(viewport=VIEWPORT)
    try:
        page = context.new_page()
        page.goto(f"{secured_gateway_url}/")
        page.get_by_label("Send camera frames").set_checked(False)
        page.get_by_test_id("api-key").fill("not-a-key")
        page.get_by_test_id("start-button").click()
        page.wait_for_function("() => gemmaMesh.state === 'closed'", timeout=30_000)
        assert "authentication_error" in page.get_by_test_id("log").inner_text()
        assert page.get_by_test_id("start-button").is_enabled()

        page.get_by_test_id("api-key").fill("test-key-1")
        page.get_by_test_id("start-button").click()
        page.wait_for_function("() => gemmaMesh.state === 'live'", timeout=30_000)
        page.evaluate("() => gemmaMesh.stop()")
        page.wait_for_function("() => gemmaMesh.state === 'closed'", timeout=30_000)
    finally:
        context.close()

"""The ``gemma-mesh`` command line (typer).

Commands that need torch (``make-tiny``, ``export``) import it lazily, so a serving install without
the ``export`` extra still runs the rest.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from gemma_mesh.common.errors import MeshError
from gemma_mesh.common.logging import configure_logging

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

app = typer.Typer(
    name="gemma-mesh",
    help="Serving mesh for Gemma 4 E4B IT: export, generate and serve.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


_LOG_LEVEL: dict[str, str | None] = {"explicit": None}


def _print_version(value: bool) -> None:
    if value:
        from gemma_mesh import __version__

        typer.echo(f"gemma-mesh {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    log_level: Annotated[
        str | None, typer.Option(help="DEBUG, INFO, WARNING or ERROR (default: WARNING; servers: INFO)")
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version")
    ] = False,
) -> None:
    if log_level is not None and log_level.upper() not in LOG_LEVELS:
        raise typer.BadParameter(f"must be one of {', '.join(LOG_LEVELS)}", param_hint="--log-level")
    _LOG_LEVEL["explicit"] = log_level
    configure_logging(log_level or "WARNING")


def _server_overrides(**values: object) -> dict[str, object]:
    """Command-line values that override the service settings (None = keep the environment's)."""
    values["log_level"] = _LOG_LEVEL["explicit"]
    return {k: v for k, v in values.items() if v is not None}


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can cause (bad input, bad files, bad bundles) into ``error: ...`` and exit 2."""
    try:
        yield
    except MeshError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from exc
    except ValidationError as exc:  # settings from options or GEMMA_MESH_* variables
        for problem in exc.errors():
            where = ".".join(str(p) for p in problem["loc"]) or exc.title
            typer.echo(f"error: {where}: {problem['msg']}", err=True)
        raise typer.Exit(2) from exc
    except (OSError, ValueError) as exc:  # unreadable/unwritable paths, invalid configs and manifests
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(2) from exc


# Top-level modules of the ``export`` extra's packages.
EXPORT_MODULES = frozenset({"torch", "torchvision", "transformers", "safetensors", "onnxscript", "onnx_ir"})


@contextmanager
def export_dependencies(command: str) -> Iterator[None]:
    """Imports of the ``export`` extra (torch, transformers): missing in a serving-only install, which
    is a one-line ``error:`` naming the extra, exit 2."""
    try:
        yield
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in EXPORT_MODULES:
            raise
        typer.echo(
            f"error: {command} needs the exporter's dependencies ({exc.name} is not installed): "
            "pip install 'gemma-mesh[export]'",
            err=True,
        )
        raise typer.Exit(2) from exc


serve_app = typer.Typer(help="Run one gRPC service of the mesh.", no_args_is_help=True)
app.add_typer(serve_app, name="serve")


@serve_app.command("decoder")
def serve_decoder(
    bundle: Annotated[
        Path | None, typer.Option(help="Bundle directory (default: the embedded tiny bundle)")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Interface to bind")] = None,
    port: Annotated[int | None, typer.Option(help="gRPC port")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus /metrics port")] = None,
) -> None:
    """The decoder: streaming generation with continuous batching and prefix caching.

    Every other setting comes from GEMMA_MESH_DECODER_* environment variables (see decoder/settings.py).
    """
    from gemma_mesh.decoder.server import run_decoder_server
    from gemma_mesh.decoder.settings import DecoderSettings

    with user_errors():  # a bad bundle (format, files) is a one-line error, exit 2
        run_decoder_server(
            DecoderSettings(
                **_server_overrides(bundle=bundle, host=host, port=port, metrics_port=metrics_port)
            )
        )


@serve_app.command("audio")
def serve_audio(
    bundle: Annotated[
        Path | None, typer.Option(help="Bundle directory (default: the embedded tiny bundle)")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Interface to bind")] = None,
    port: Annotated[int | None, typer.Option(help="gRPC port (default 50052; 0 = a free port)")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus /metrics port")] = None,
) -> None:
    """The audio frontend: PCM or audio files -> Gemma 4 audio soft tokens (Encode, EncodeStream).

    Every other setting comes from GEMMA_MESH_AUDIO_* environment variables (see docs/encoders.md).
    """
    from gemma_mesh.audio.server import run_audio_server
    from gemma_mesh.audio.settings import AudioSettings

    with user_errors():  # a bad bundle (format, files) is a one-line error, exit 2
        run_audio_server(
            AudioSettings(**_server_overrides(bundle=bundle, host=host, port=port, metrics_port=metrics_port))
        )


@serve_app.command("vision")
def serve_vision(
    bundle: Annotated[
        Path | None, typer.Option(help="Bundle directory (default: the embedded tiny bundle)")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Interface to bind")] = None,
    port: Annotated[int | None, typer.Option(help="gRPC port (default 50053; 0 = a free port)")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus /metrics port")] = None,
) -> None:
    """The vision encoder: images, camera frames and video -> Gemma 4 image soft tokens.

    Every other setting comes from GEMMA_MESH_VISION_* environment variables (see docs/encoders.md).
    """
    from gemma_mesh.vision.server import run_vision_server
    from gemma_mesh.vision.settings import VisionSettings

    with user_errors():  # a bad bundle (format, files) is a one-line error, exit 2
        run_vision_server(
            VisionSettings(
                **_server_overrides(bundle=bundle, host=host, port=port, metrics_port=metrics_port)
            )
        )


@serve_app.command("gateway")
def serve_gateway(
    host: Annotated[str | None, typer.Option(help="Interface to bind")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP/WebSocket port (default 8000)")] = None,
    redis_url: Annotated[
        str | None, typer.Option(help="Redis URL for sessions (default: in-process store)")
    ] = None,
    decoder: Annotated[str | None, typer.Option(help="Decoder gRPC target (default 127.0.0.1:50051)")] = None,
    audio: Annotated[str | None, typer.Option(help="Audio frontend target (default 127.0.0.1:50052)")] = None,
    vision: Annotated[
        str | None, typer.Option(help="Vision encoder target (default 127.0.0.1:50053)")
    ] = None,
) -> None:
    """The gateway: WebSocket /v1/stream, the OpenAI-compatible API, the browser page, /metrics.

    Every other setting comes from GEMMA_MESH_GATEWAY_* environment variables (see docs/protocol.md).
    """
    from gemma_mesh.gateway.server import run_gateway_server
    from gemma_mesh.gateway.settings import GatewaySettings

    overrides = _server_overrides(
        host=host,
        port=port,
        redis_url=redis_url,
        decoder_target=decoder,
        audio_target=audio,
        vision_target=vision,
    )
    with user_errors():
        settings = GatewaySettings(**overrides)
        run_gateway_server(settings)


@app.command("make-tiny")
def make_tiny(
    out: Annotated[Path, typer.Option(help="Directory for the checkpoint")],
    seed: Annotated[int, typer.Option(help="Weights are a pure function of size and seed")] = 0,
    size: Annotated[
        str, typer.Option(help="tiny (a few MB), small (about 100M parameters) or e4b (E4B sizes, ~8B, bf16)")
    ] = "tiny",
) -> None:
    """Build a deterministic random Gemma 4 checkpoint (Hugging Face format) with every E4B feature."""
    from gemma_mesh.model.tiny import PRESETS, make_tiny_checkpoint

    if size not in PRESETS:
        raise typer.BadParameter(f"size must be one of {sorted(PRESETS)}", param_hint="--size")
    if not 0 <= seed < 2**63:
        raise typer.BadParameter("must be in [0, 2**63)", param_hint="--seed")
    with user_errors(), export_dependencies("make-tiny"):
        make_tiny_checkpoint(out, seed=seed, size=size)
    typer.echo(f"wrote {size} Gemma 4 checkpoint to {out}")


@app.command("export")
def export(
    checkpoint: Annotated[Path, typer.Option(help="Local Hugging Face Gemma 4 checkpoint directory")],
    out: Annotated[Path, typer.Option(help="Bundle directory to write")],
    dtype: Annotated[str, typer.Option(help="float32 or float16")] = "float32",
    weights: Annotated[str, typer.Option(help="float, or int4 for 4-bit decoder MatMul weights")] = "float",
) -> None:
    """Export a checkpoint to a model bundle: five ONNX graphs, tokenizer, template and manifest."""
    from gemma_mesh.model.export.exporter import export_bundle

    with user_errors(), export_dependencies("export"):
        if not (checkpoint / "config.json").exists():
            raise FileNotFoundError(f"{checkpoint} has no config.json: not a Hugging Face checkpoint")
        export_bundle(checkpoint, out, dtype=dtype, weights=weights, progress=sys.stderr.isatty())
    typer.echo(f"wrote bundle to {out}")


@app.command("generate")
def generate(
    prompt: Annotated[str | None, typer.Option(help="The user's text")] = None,
    prompt_file: Annotated[Path | None, typer.Option(help="Read the user's text from a UTF-8 file")] = None,
    bundle: Annotated[
        Path | None, typer.Option(help="Bundle directory (default: the embedded tiny bundle)")
    ] = None,
    image: Annotated[list[Path] | None, typer.Option(help="Image file; repeat for several")] = None,
    audio: Annotated[list[Path] | None, typer.Option(help="Audio file; repeat for several")] = None,
    system: Annotated[str | None, typer.Option(help="System prompt")] = None,
    max_tokens: Annotated[int, typer.Option(help="Maximum new tokens")] = 64,
    temperature: Annotated[
        float | None, typer.Option(help="Sampling temperature (greedy if omitted)")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed")] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help='Print {"text": ..., "token_ids": [...]}')
    ] = False,
) -> None:
    """One user turn (images, then audio clips, then the text); streams the answer to stdout."""
    from gemma_mesh.pipeline import run_generate

    with user_errors():
        if prompt_file is not None:
            prompt = prompt_file.read_text(encoding="utf-8")
        if prompt is None:
            raise ValueError("give --prompt or --prompt-file")
        result = run_generate(
            bundle_path=bundle,
            prompt=prompt,
            images=image or [],
            audios=audio or [],
            system=system,
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
            on_text=None if json_output else (lambda s: (sys.stdout.write(s), sys.stdout.flush())),
        )
    if json_output:
        typer.echo(json.dumps({"text": result.text, "token_ids": result.token_ids}, ensure_ascii=False))
    else:
        sys.stdout.write("\n")


@app.command()
def up(
    bundle: Annotated[
        Path | None, typer.Option(help="Bundle directory (default: the embedded tiny bundle)")
    ] = None,
    redis_url: Annotated[
        str | None, typer.Option(help="Redis URL for sessions (default: in-process)")
    ] = None,
    host: Annotated[str, typer.Option(help="Gateway interface")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Gateway HTTP/WebSocket port")] = 8000,
    drain_grace_s: Annotated[
        float, typer.Option(help="On stop, seconds live sessions get to deliver their finals")
    ] = 10.0,
) -> None:
    """Run the whole mesh locally: decoder, audio, vision and gateway as supervised child processes.

    Waits until every service is healthy, prints the URLs, restarts a crashed service with backoff,
    and stops everything on Ctrl-C or SIGTERM.
    """
    import asyncio

    from rich.console import Console

    from gemma_mesh.preflight import check_mesh_setup
    from gemma_mesh.up import Mesh, MeshConfig

    console = Console(stderr=True)

    async def main() -> None:
        config = MeshConfig(
            bundle=bundle,
            redis_url=redis_url,
            host=host,
            port=port,
            log_level=_child_level(),
            drain_grace_s=drain_grace_s,
        )
        async with Mesh(config) as mesh:
            for name, url in mesh.urls().items():
                console.print(f"[bold]{name:16}[/bold] {url}")
            console.print("mesh is up; Ctrl-C stops it")
            await mesh.wait_for_signal()

    with user_errors():
        check_mesh_setup(bundle, redis_url)
        asyncio.run(main())


def _child_level() -> str:
    return _LOG_LEVEL["explicit"] or "WARNING"


@app.command()
def stream(
    file: Annotated[
        Path, typer.Argument(help="Audio file to stream as a microphone (WAV, FLAC, MP3, OGG...)")
    ],
    image: Annotated[Path | None, typer.Option(help="Photo to stream as a camera")] = None,
    video: Annotated[Path | None, typer.Option(help="Video file to stream as a camera")] = None,
    task: Annotated[str, typer.Option(help="transcribe or translate")] = "transcribe",
    target_language: Annotated[str | None, typer.Option(help="BCP-47 target of translate")] = None,
    realtime: Annotated[bool, typer.Option(help="Send audio at real time (default: 8x)")] = False,
    url: Annotated[str, typer.Option(help="Gateway base URL")] = "http://127.0.0.1:8000",
    api_key: Annotated[str | None, typer.Option(envvar="GEMMA_MESH_API_KEY", help="API key")] = None,
    fps: Annotated[float, typer.Option(help="Camera frames per second")] = 1.0,
    prompt: Annotated[
        str, typer.Option(help="Frame-analysis prompt")
    ] = "Describe what you see in one sentence.",
    partials: Annotated[bool, typer.Option(help="Also print partial hypotheses when piped")] = False,
) -> None:
    """Stream a file through a live session and print captions (and frame analysis) as they come."""
    import asyncio

    from gemma_mesh.stream_client import StreamOptions
    from gemma_mesh.stream_client import stream as run_stream
    from gemma_mesh.stream_view import StreamView

    if task not in ("transcribe", "translate"):
        raise typer.BadParameter("must be transcribe or translate", param_hint="--task")
    options = StreamOptions(
        audio=file,
        url=url.rstrip("/"),
        image=image,
        video=video,
        task=task,
        target_language=target_language,
        realtime=realtime,
        api_key=api_key,
        fps=fps,
        prompt=prompt,
    )
    for path in (file, image, video):
        if path is not None and not path.is_file():
            _fail(f"no such file: {path}")
    with user_errors(), StreamView(partials=partials) as view:
        result = asyncio.run(run_stream(options, view.on_event))
    finals = result.of_type("caption.final", "translation.final")
    if not finals:
        typer.echo("no speech detected", err=True)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@app.command()
def demo(
    bundle: Annotated[
        Path | None, typer.Option(help="Bundle directory (default: the embedded tiny bundle)")
    ] = None,
    samples_dir: Annotated[Path, typer.Option(help="Where to write the sample photo and speech clip")] = Path(
        "runs/samples"
    ),
    port: Annotated[int, typer.Option(help="Gateway port")] = 8000,
    keep_running: Annotated[
        bool | None,
        typer.Option(help="Leave the mesh (and the browser page) up until Ctrl-C; default: when interactive"),
    ] = None,
) -> None:
    """The main job on real input: start the mesh, stream a real speech recording and a real photo
    through a live session, print the captions and the frame analysis, leave the page up."""
    import asyncio

    from rich.console import Console

    from gemma_mesh.preflight import check_mesh_setup
    from gemma_mesh.samples import librivox_transcripts, write_samples
    from gemma_mesh.stream_client import StreamOptions
    from gemma_mesh.stream_client import stream as run_stream
    from gemma_mesh.stream_view import StreamView
    from gemma_mesh.up import Mesh, MeshConfig

    console = Console(stderr=True)
    keep = sys.stdin.isatty() and sys.stdout.isatty() if keep_running is None else keep_running

    async def main() -> None:
        photo, speech = write_samples(samples_dir)
        console.print(f"[bold]photo[/bold]  {photo}")
        console.print(
            f"[bold]speech[/bold] {speech}  ([italic]{librivox_transcripts().get(speech.stem, '?')}[/italic])"
        )
        console.print(f"[bold]bundle[/bold] {bundle or 'embedded tiny (random weights: the text is noise)'}")
        console.print("starting the mesh (decoder, audio, vision, gateway) ...")
        async with Mesh(MeshConfig(bundle=bundle, port=port, log_level=_child_level())) as mesh:
            console.print(f"[bold]page[/bold]   {mesh.urls()['page']}")
            options = StreamOptions(audio=speech, image=photo, url=mesh.gateway_url, fps=1.0, realtime=True)
            with StreamView() as view:
                result = await run_stream(options, view.on_event)
            finals = result.of_type("caption.final")
            analyses = [e for e in result.of_type("frame.analysis") if e["done"]]
            console.print(f"{len(finals)} final caption(s), {len(analyses)} frame analysis(es)")
            if not finals or not analyses:
                raise MeshError("the demo produced no caption or no frame analysis")
            if keep:
                console.print(f"the page is at {mesh.urls()['page']}; Ctrl-C stops the mesh")
                await mesh.wait_for_signal()

    with user_errors():
        check_mesh_setup(bundle, None)
        asyncio.run(main())


if __name__ == "__main__":
    app()

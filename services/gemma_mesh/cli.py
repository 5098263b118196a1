"""The ``gemma-mesh`` command line (typer).

Commands that need torch (``make-tiny``, ``export``) import it lazily, so a serving install without
the ``export`` extra still runs the rest.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from gemma_mesh.common.errors import MeshError
from gemma_mesh.common.logging import configure_logging

app = typer.Typer(
    name="gemma-mesh",
    help="Serving mesh for Gemma 4 E4B IT: export, generate and serve.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main(log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR")] = "WARNING") -> None:
    configure_logging(log_level)


@app.command("make-tiny")
def make_tiny(
    out: Annotated[Path, typer.Option(help="Directory for the checkpoint")],
    seed: Annotated[int, typer.Option(help="Weights are a pure function of size and seed")] = 0,
    size: Annotated[str, typer.Option(help="tiny (a few MB) or small (about 100M parameters)")] = "tiny",
) -> None:
    """Build a deterministic random Gemma 4 checkpoint (Hugging Face format) with every E4B feature."""
    from gemma_mesh.model.tiny import PRESETS, make_tiny_checkpoint

    if size not in PRESETS:
        raise typer.BadParameter(f"size must be one of {sorted(PRESETS)}", param_hint="--size")
    make_tiny_checkpoint(out, seed=seed, size=size)
    typer.echo(f"wrote {size} Gemma 4 checkpoint to {out}")


@app.command("export")
def export(
    checkpoint: Annotated[Path, typer.Option(help="Local Hugging Face Gemma 4 checkpoint directory")],
    out: Annotated[Path, typer.Option(help="Bundle directory to write")],
    dtype: Annotated[str, typer.Option(help="float32 or float16")] = "float32",
    weights: Annotated[str, typer.Option(help="float, or int4 for 4-bit decoder MatMul weights")] = "float",
) -> None:
    """Export a checkpoint to a model bundle: four ONNX graphs, tokenizer, template and manifest."""
    from gemma_mesh.model.export.exporter import export_bundle

    if not (checkpoint / "config.json").exists():
        raise typer.BadParameter(f"{checkpoint} has no config.json", param_hint="--checkpoint")
    try:
        export_bundle(checkpoint, out, dtype=dtype, weights=weights, progress=sys.stderr.isatty())
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(f"wrote bundle to {out}")


@app.command("generate")
def generate(
    prompt: Annotated[str, typer.Option(help="The user's text")],
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
    from gemma_mesh.model.pipeline import run_generate

    try:
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
    except MeshError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from exc
    if json_output:
        typer.echo(json.dumps({"text": result.text, "token_ids": result.token_ids}, ensure_ascii=False))
    else:
        sys.stdout.write("\n")


if __name__ == "__main__":
    app()

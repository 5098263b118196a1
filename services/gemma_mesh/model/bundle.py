"""``ModelBundle``: a loaded bundle directory (manifest, tokenizer, chat template, preprocessors, ONNX sessions).

Torch-free. Every service builds one and uses only the graphs it needs: sessions are created on
first use, with the execution-provider list and thread counts given here.
"""

from __future__ import annotations

import json
import threading
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError
from tokenizers import Tokenizer

from gemma_mesh.common.errors import InvalidRequest, NotFound
from gemma_mesh.common.logging import get_logger
from gemma_mesh.model.manifest import Manifest

log = get_logger("bundle")

EMBEDDED_BUNDLE = "tiny"


def embedded_bundle_path() -> Path:
    """Path of the tiny bundle shipped inside the package (the default when no ``--bundle`` is given)."""
    return Path(str(resources.files("gemma_mesh.model") / "embedded" / EMBEDDED_BUNDLE))


def _processor_settings(bundle_dir: Path) -> dict[str, dict[str, Any]]:
    """Feature-extractor, image- and video-processor settings, from either processor file layout."""
    out: dict[str, dict[str, Any]] = {}
    proc = bundle_dir / "processor_config.json"
    if proc.exists():
        data = json.loads(proc.read_text(encoding="utf-8"))
        for key in ("feature_extractor", "image_processor", "video_processor"):
            if isinstance(data.get(key), dict):
                out[key] = data[key]
        out["processor"] = {k: v for k, v in data.items() if not isinstance(v, dict)}
    pre = bundle_dir / "preprocessor_config.json"
    if pre.exists():
        data = json.loads(pre.read_text(encoding="utf-8"))
        if "feature_extractor_type" in data:
            out.setdefault("feature_extractor", data)
        else:
            out.setdefault("image_processor", data)
    video = bundle_dir / "video_preprocessor_config.json"
    if video.exists():
        out.setdefault("video_processor", json.loads(video.read_text(encoding="utf-8")))
    return out


class ModelBundle:
    """A bundle directory written by ``gemma-mesh export``.

    Args:
        path: the bundle directory; ``None`` for the embedded tiny bundle.
        providers: ONNX Runtime execution providers in order of preference, e.g.
            ``["CUDAExecutionProvider", "CPUExecutionProvider"]``; unavailable ones are dropped.
        intra_op_threads: threads per ONNX Runtime operator (0 = ORT's default).
        inter_op_threads: threads across operators (0 = ORT's default).
        allow_spinning: ORT's ``session.intra_op.allow_spinning``: idle pool threads busy-wait for
            the next run (ORT's default, lowest latency on a dedicated machine). Off by default: with
            several services per node, spinning threads burn the cores the others need (measured
            on 2 cores, 1 live session: decoder 21.6 -> 7.8 % of a core, audio frontend 8.3 -> 1.9 %).

    Raises:
        NotFound: the directory or its manifest is missing.
        ValueError: the manifest does not validate (unknown format version, inconsistent layout).
    """

    def __init__(
        self,
        path: Path | str | None = None,
        *,
        providers: list[str] | None = None,
        intra_op_threads: int = 0,
        inter_op_threads: int = 0,
        allow_spinning: bool = False,
    ) -> None:
        self.path = Path(path) if path is not None else embedded_bundle_path()
        manifest_path = self.path / "manifest.json"
        if not manifest_path.exists():
            raise NotFound(
                f"no bundle at {self.path} (manifest.json missing); create one with `gemma-mesh export`"
            )
        try:
            self.manifest = Manifest.model_validate_json(manifest_path.read_text(encoding="utf-8"))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "manifest"
            raise InvalidRequest(f"invalid bundle manifest {manifest_path}: {where}: {first['msg']}") from exc
        for name in ("tokenizer.json", "chat_template.jinja", "processor_config.json"):
            if not (self.path / name).exists():
                raise NotFound(f"bundle {self.path} lacks {name}; re-export it with `gemma-mesh export`")
        self.providers = self._choose_providers(providers)
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads
        self.allow_spinning = allow_spinning
        self._sessions: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.settings = _processor_settings(self.path)
        roles = ("image", "audio", "video")
        self._multimodal_ids = [self.manifest.token_id(r) for r in roles if r in self.manifest.special_tokens]
        self._pad_id = self.manifest.token_id("pad")

    @classmethod
    def from_settings(cls, settings: Any) -> ModelBundle:
        """The bundle a service's settings name (``bundle``, ``providers``, ORT thread counts)."""
        return cls(
            settings.bundle,
            providers=settings.providers,
            intra_op_threads=settings.intra_op_threads,
            inter_op_threads=settings.inter_op_threads,
            allow_spinning=settings.allow_spinning,
        )

    @staticmethod
    def _choose_providers(requested: list[str] | None) -> list[str]:
        import onnxruntime as ort

        available = set(ort.get_available_providers())
        wanted = requested or ["CUDAExecutionProvider", "CPUExecutionProvider"]
        chosen = [p for p in wanted if p in available]
        if "CPUExecutionProvider" not in chosen:
            chosen.append("CPUExecutionProvider")
        return chosen

    # ----------------------------------------------------------------- text
    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The checkpoint's ``tokenizer.json`` as a ``tokenizers.Tokenizer``."""
        return Tokenizer.from_file(str(self.path / "tokenizer.json"))

    @cached_property
    def chat_template(self) -> str:
        """The checkpoint's chat template (``chat_template.jinja``)."""
        return (self.path / "chat_template.jinja").read_text(encoding="utf-8")

    @cached_property
    def tokenizer_config(self) -> dict[str, Any]:
        path = self.path / "tokenizer_config.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}

    @cached_property
    def prompt_builder(self) -> Any:
        """A ``PromptBuilder`` for this bundle's tokenizer, template and special tokens."""
        from gemma_mesh.model.prompt import PromptBuilder

        token_map = {role: entry.id for role, entry in self.manifest.special_tokens.items()}
        return PromptBuilder.from_dir(self.path, token_map)

    # ---------------------------------------------------------- preprocess
    @cached_property
    def log_mel(self) -> Any:
        """``LogMelExtractor`` with the checkpoint's feature-extractor settings."""
        from gemma_mesh.model.audio_features import LogMelExtractor

        return LogMelExtractor.from_settings(
            self.settings.get("feature_extractor", {}), audio_seq_length=self.manifest.audio.max_soft_tokens
        )

    @cached_property
    def image_processor(self) -> Any:
        """``ImageProcessor`` with the checkpoint's image-processor settings."""
        from gemma_mesh.model.image_processing import ImageProcessor

        return ImageProcessor.from_settings(self.settings.get("image_processor", {}))

    # ------------------------------------------------------------ sessions
    def session(self, graph: str) -> Any:
        """The ONNX Runtime session of ``graph`` (created on first use; thread-safe).

        Raises:
            NotFound: the bundle has no such graph, or its file is missing.
        """
        with self._lock:
            sess = self._sessions.get(graph)
            if sess is not None:
                return sess
            entry = self.manifest.graphs.get(graph)
            if entry is None:
                raise NotFound(f"bundle {self.path} has no graph {graph!r}")
            if not (self.path / entry.file).is_file():
                raise NotFound(
                    f"bundle {self.path}: the manifest's graph {graph!r} file {entry.file} is missing; "
                    "re-export the bundle with `gemma-mesh export`"
                )
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = self.intra_op_threads
            options.inter_op_num_threads = self.inter_op_threads
            spin = "1" if self.allow_spinning else "0"
            options.add_session_config_entry("session.intra_op.allow_spinning", spin)
            options.add_session_config_entry("session.inter_op.allow_spinning", spin)
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.log_severity_level = 3  # errors only: ORT warns about unfoldable CastLike nodes
            sess = ort.InferenceSession(
                str(self.path / entry.file), sess_options=options, providers=self.providers
            )
            self._sessions[graph] = sess
            log.info("session ready", graph=graph, providers=sess.get_providers())
            return sess

    @property
    def loaded_graphs(self) -> list[str]:
        """Names of the graphs whose session exists, sorted (what a service loaded before SERVING)."""
        with self._lock:
            return sorted(self._sessions)

    @cached_property
    def float_dtype(self) -> np.dtype:
        """numpy dtype of the graphs' float inputs and outputs (``float32`` or ``float16``)."""
        return np.dtype(np.float16 if self.manifest.dtype == "float16" else np.float32)

    # ------------------------------------------------------------ encoders
    def embed(self, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``input_ids [B, S] int64 -> (inputs_embeds [B, S, H], per_layer_inputs [B, S, L, P])``.

        Multimodal placeholder ids are embedded as the pad token (``Gemma4Model.forward`` does the
        same); callers then write soft tokens over those rows.
        """
        ids = np.array(input_ids, dtype=np.int64)  # a copy: the placeholders are overwritten
        for placeholder in self._multimodal_ids:  # (3 ids: faster than np.isin on every decode step)
            ids[ids == placeholder] = self._pad_id
        embeds, per_layer = self.session("embed_tokens").run(None, {"input_ids": ids})
        return embeds, per_layer

    def encode_audio(self, waveform: np.ndarray) -> np.ndarray:
        """One mono 16 kHz clip ``[samples] float32`` -> soft tokens ``[n, H]`` (``n = log_mel.num_soft_tokens``).

        Raises:
            InvalidRequest: empty, non-finite or over-long audio (see ``LogMelExtractor``).
        """
        features, mask = self.log_mel(waveform)
        tokens = self.encode_audio_features([features], [mask])[0]
        if tokens.shape[0] == 0:
            raise InvalidRequest(
                f"audio of {len(waveform)} samples is too short to give a soft token "
                f"(about {self.manifest.audio.ms_per_token} ms of audio per token)"
            )
        return tokens

    def encode_audio_features(self, features: list[np.ndarray], masks: list[np.ndarray]) -> list[np.ndarray]:
        """Batch of log-mel clips (``[T_i, F]`` float32, ``[T_i]`` bool) -> soft tokens ``[n_i, H]`` each.

        Frames are padded (masked) to a common length that is a multiple of
        ``manifest.audio.frames_multiple``; valid outputs are unaffected by that padding. The two
        audio graphs in turn: ``audio_subsample``, then ``audio_conformer`` (``Gemma4AudioModel`` +
        ``embed_audio``, as ``Gemma4Model.get_audio_features`` computes it).
        """
        if not features:
            return []
        multiple = self.manifest.audio.frames_multiple
        longest = max(f.shape[0] for f in features)
        frames = max(multiple, -(-longest // multiple) * multiple)
        batch = np.zeros((len(features), frames, features[0].shape[1]), dtype=self.float_dtype)
        batch_mask = np.zeros((len(features), frames), dtype=bool)
        for i, (f, m) in enumerate(zip(features, masks, strict=True)):
            batch[i, : f.shape[0]] = f
            batch_mask[i, : m.shape[0]] = m
        out = self.audio_conformer(*self.audio_subsample(batch, batch_mask))
        counts = [self._audio_tokens_from_mask(m) for m in masks]
        return [out[i, :n] for i, n in enumerate(counts)]

    def audio_subsample(self, features: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ``audio_subsample`` graph: log-mel ``[B, T, F]`` + mask ``[B, T]`` bool (``T`` a multiple
        of 4) -> embeddings ``[B, T/4, Ha]`` + token mask ``[B, T/4]`` bool
        (``Gemma4AudioSubSampleConvProjection``: embedding ``u`` reads frames ``4u - 3 .. 4u + 3``)."""
        embeddings, token_mask = self.session("audio_subsample").run(
            None,
            {"input_features": features.astype(self.float_dtype, copy=False), "input_features_mask": mask},
        )
        return embeddings, token_mask

    def audio_conformer(self, embeddings: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The ``audio_conformer`` graph: embeddings ``[B, U, Ha]`` + mask ``[B, U]`` bool (``U`` a multiple
        of ``frames_multiple / 4``; padding masked) -> soft tokens ``[B, U, H]`` (rows past the valid
        count are padding)."""
        (out,) = self.session("audio_conformer").run(
            None, {"audio_embeddings": embeddings, "audio_embeddings_mask": mask}
        )
        return out

    def _audio_tokens_from_mask(self, mask: np.ndarray) -> int:
        # Gemma4Processor.replace_audio_token: two stride-2 subsamplings of the frame mask.
        m = np.asarray(mask, dtype=bool)
        for _ in range(2):
            t_out = (len(m) + 2 - 3) // 2 + 1
            m = m[::2][:t_out]
        return min(int(m.sum()), self.manifest.audio.max_soft_tokens)

    def encode_images(self, images: list[Any]) -> list[np.ndarray]:
        """Preprocessed images (``PreprocessedImage``, same budget or not) -> soft tokens ``[n_i, H]`` each.

        Images with different budgets are padded to the largest patch count (padding patches have
        position -1 and do not affect valid outputs).
        """
        if not images:
            return []
        patches = max(im.pixel_values.shape[0] for im in images)
        width = images[0].pixel_values.shape[1]
        pixels = np.zeros((len(images), patches, width), dtype=self.float_dtype)
        positions = np.full((len(images), patches, 2), -1, dtype=np.int64)
        for i, im in enumerate(images):
            n = im.pixel_values.shape[0]
            pixels[i, :n] = im.pixel_values
            positions[i, :n] = im.position_ids
        (out,) = self.session("vision_encoder").run(
            None, {"pixel_values": pixels, "pixel_position_ids": positions}
        )
        return [out[i, : im.num_soft_tokens] for i, im in enumerate(images)]

    def check_graphs(self, *names: str) -> None:
        """Raise ``InvalidRequest`` naming the first of ``names`` this bundle lacks."""
        for name in names:
            if name not in self.manifest.graphs:
                raise InvalidRequest(f"bundle {self.path.name} has no {name} graph")

"""The gateway's captioning policy, pure (numpy and strings in, decisions out; no I/O, no asyncio).

``vad``: Silero VAD on ONNX Runtime and the ``VadSegmenter`` that cuts a 16 kHz stream into speech
segments. ``agreement``: ``LocalAgreement`` (LocalAgreement-2) for stable partial captions and
``RepetitionGuard`` against looping decodes.
"""

from gemma_mesh.gateway.captioning.agreement import (
    AgreementResult,
    GuardResult,
    LocalAgreement,
    RepetitionGuard,
    normalize_word,
    split_words,
)
from gemma_mesh.gateway.captioning.vad import (
    SAMPLE_RATE_HZ,
    OpenSegment,
    SegmentClosed,
    SegmentEvent,
    SegmentStarted,
    SileroVad,
    SpeechProbabilityModel,
    VadSegmenter,
    VadSettings,
    find_silero_model,
)

__all__ = [
    "SAMPLE_RATE_HZ",
    "AgreementResult",
    "GuardResult",
    "LocalAgreement",
    "OpenSegment",
    "RepetitionGuard",
    "SegmentClosed",
    "SegmentEvent",
    "SegmentStarted",
    "SileroVad",
    "SpeechProbabilityModel",
    "VadSegmenter",
    "VadSettings",
    "find_silero_model",
    "normalize_word",
    "split_words",
]

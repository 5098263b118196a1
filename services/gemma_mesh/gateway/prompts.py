"""The instructions the gateway gives the model for each task, and BCP-47 language handling.

The chat template and special tokens come from the bundle (the decoder applies them); this module
only writes the user text that follows the audio or image, in the phrasing of Gemma's audio
examples ("Transcribe the following speech segment in ...").
"""

from __future__ import annotations

import langcodes

from gemma_mesh.common.errors import InvalidRequest


def language_name(tag: str, *, param: str) -> str:
    """The English name of a BCP-47 tag (``"pt-BR"`` -> ``"Portuguese (Brazil)"``).

    Raises:
        InvalidRequest: not a well-formed tag, or a language langcodes does not know.
    """
    try:
        language = langcodes.Language.get(tag)
    except (langcodes.tag_parser.LanguageTagError, ValueError) as error:
        raise InvalidRequest(
            f"{param}: {tag!r} is not a BCP-47 language tag ({error})", param=param
        ) from None
    name = language.display_name("en")
    # Well-formed but unassigned subtags ("zz", "qaa") have no name in CLDR: not a language to speak.
    if not language.is_valid() or not language.language or name.startswith("Unknown language"):
        raise InvalidRequest(f"{param}: {tag!r} is not a known BCP-47 language", param=param)
    return name


def normalize_language(tag: str, *, param: str) -> str:
    """The canonical form of a BCP-47 tag (``"EN-us"`` -> ``"en-US"``). Raises InvalidRequest."""
    language_name(tag, param=param)
    return langcodes.standardize_tag(tag)


def transcription_instruction(source_language: str | None = None) -> str:
    """User text after the audio for speech recognition (thinking off)."""
    where = f" in {language_name(source_language, param='source_language')}" if source_language else ""
    return (
        f"Transcribe the following speech segment{where}. "
        "Only output the transcription, with no newlines and no commentary."
    )


def translation_instruction(target_language: str, source_language: str | None = None) -> str:
    """User text after the audio for speech-to-text translation into ``target_language`` (thinking off)."""
    target = language_name(target_language, param="target_language")
    where = f" from {language_name(source_language, param='source_language')}" if source_language else ""
    return (
        f"Translate the following speech segment{where} into {target}. "
        f"Only output the {target} translation, with no newlines and no commentary."
    )


def context_text(context: str) -> str:
    """User text before the audio that gives the speech's context (OpenAI's transcription
    ``prompt``: earlier speech, names and terms to expect; Whisper conditions on it the same way)."""
    return f"Context of the speech that follows (earlier speech, names, terms): {context.strip()}"

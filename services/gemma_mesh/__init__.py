"""gemma-mesh: a serving mesh for Gemma 4 E4B IT (text, image and audio in; text out).

The package is laid out as in DESIGN.md: ``model`` (bundle, export, preprocessing, prompt),
one package per gRPC service, ``gateway`` and ``common`` (settings, errors, logging, metrics).
"""

__version__ = "0.1.0"

"""gemma-mesh: a serving mesh for Gemma 4 E4B IT (text, image and audio in; text out).

Packages: ``model`` (bundle, export, preprocessing, prompt), one package per gRPC service
(``decoder``, ``audio``, ``vision``), ``gateway`` and ``common`` (settings, errors, logging, metrics).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gemma-mesh")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.1.0"

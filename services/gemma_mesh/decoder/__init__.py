"""The decoder service: streaming generation on ONNX Runtime with continuous batching and prefix caching."""

"""The OpenAI-compatible HTTP API: protocol (request/response models), serving (logic), router (routes)."""

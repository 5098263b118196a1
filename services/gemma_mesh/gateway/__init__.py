"""The gateway: live WebSocket sessions, the OpenAI-compatible API and the captioning policy."""

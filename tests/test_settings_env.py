"""List settings from the environment: JSON lists (what the chart and Compose render) and the
comma-separated text people type both work; a broken JSON list names the fix."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gemma_mesh.decoder.settings import DecoderSettings
from gemma_mesh.gateway.settings import GatewaySettings


@pytest.mark.parametrize(
    ("text", "keys"),
    [
        ("sk-plain", ["sk-plain"]),
        ("key-1, key-2", ["key-1", "key-2"]),
        ('["key-1","key-2"]', ["key-1", "key-2"]),
        ("", []),
    ],
)
def test_api_keys_from_the_environment(monkeypatch, text, keys):
    monkeypatch.setenv("GEMMA_MESH_GATEWAY_API_KEYS", text)
    assert [key.get_secret_value() for key in GatewaySettings().api_keys] == keys


def test_a_broken_json_list_names_both_forms(monkeypatch):
    monkeypatch.setenv("GEMMA_MESH_GATEWAY_ALLOWED_ORIGINS", '["http://a.example"')
    with pytest.raises(ValidationError, match=r'allowed_origins[\s\S]*write a,b or \["a","b"\]'):
        GatewaySettings()


def test_providers_as_text(monkeypatch):
    monkeypatch.setenv("GEMMA_MESH_DECODER_PROVIDERS", "CPUExecutionProvider")
    assert DecoderSettings().providers == ["CPUExecutionProvider"]

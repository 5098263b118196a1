"""Routes of the OpenAI-compatible API (placeholder until the API lands)."""

from fastapi import APIRouter

router = APIRouter()

"""The API server (OpenAI/DeepSeek-compatible) and the chat web app."""

from .server import create_app

__all__ = ["create_app"]

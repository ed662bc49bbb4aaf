"""The API server (OpenAI/DeepSeek-compatible) and the chat web app."""

from .server import Service, create_app

__all__ = ["Service", "create_app"]

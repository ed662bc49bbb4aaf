"""One client for OpenAI-compatible chat endpoints (DeepSeek's API, a nanoseek server, vLLM), on the
official openai SDK: its retries with backoff and its timeouts. Distillation asks a remote teacher
through it and `nanoseek eval --model URL` evaluates an endpoint with it. Every failed attempt is
reported; what still fails raises RemoteError, so no question is silently dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor


class RemoteError(RuntimeError):
    """The endpoint refused a request, or still failed after all attempts."""


class RemoteReply(str):
    """A remote completion's text, with the tokens its server counted (usage.completion_tokens; None
    from a server that reports no usage)."""
    completion_tokens: int | None = None


def remote_chat(url: str, model: str, api_key: str | None = None, temperature: float = 0.6, retries: int = 5,
                timeout: float = 120.0, log: Callable[[str], None] = print, concurrency: int = 8,
                thinking: bool | None = None):
    """A function (questions, max_tokens, seed) -> completions from an OpenAI-compatible endpoint's
    /v1/chat/completions, each question tried up to `retries` times, `concurrency` requests in flight
    (a batching server answers them together). A completion is rebuilt as
    `reasoning_content </think> content` so the task verifiers apply to it. `thinking` True/False asks for
    reasoning on or off (DeepSeek's `thinking` parameter); None leaves it to the model."""
    import openai  # here, not at the top: the SDK takes a second to import and most commands never need it

    base = url.rstrip("/") if url.rstrip("/").endswith("/v1") else url.rstrip("/") + "/v1"
    endpoint = base + "/chat/completions"

    def report(attempt: int, error: str) -> None:
        log(f"{endpoint}: attempt {attempt}/{retries} failed ({error})" + ("; retrying" if attempt < retries else ""))

    class ReportingClient(openai.DefaultHttpxClient):
        """Reports each failed attempt; the SDK decides whether to retry it."""

        def send(self, request, **kwargs):
            attempt = int(request.headers.get("x-stainless-retry-count", 0)) + 1
            try:
                response = super().send(request, **kwargs)
            except Exception as e:
                report(attempt, str(e))
                raise
            if response.status_code >= 500 or response.status_code == 429:
                report(attempt, f"HTTP {response.status_code}")
            return response

    # no key: a placeholder, never the OPENAI_API_KEY the SDK would otherwise send to any URL
    client = openai.OpenAI(base_url=base, api_key=api_key or "none", max_retries=retries - 1, timeout=timeout,
                           http_client=ReportingClient())

    switch = None if thinking is None else {"thinking": {"type": "enabled" if thinking else "disabled"}}

    def one(question: str, max_tokens: int, seed: int) -> str:
        try:
            reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                   max_tokens=max_tokens, temperature=temperature, seed=seed,
                                                   extra_body=switch)
        except openai.APIStatusError as e:
            if e.status_code < 500 and e.status_code != 429:  # a client error will not fix itself
                raise RemoteError(f"{endpoint}: HTTP {e.status_code}: {_said(e)}") from None
            raise RemoteError(f"{endpoint}: still failing after {retries} attempts (HTTP {e.status_code})") from None
        except openai.APIConnectionError as e:
            raise RemoteError(f"{endpoint}: still failing after {retries} attempts ({e.__cause__ or e})") from None
        except openai.APIError as e:  # e.g. a reply that is not a chat completion
            raise RemoteError(f"{endpoint}: {e}") from None
        msg = reply.choices[0].message
        text = RemoteReply(f"{getattr(msg, 'reasoning_content', None) or ''}\n</think>\n\n{msg.content or ''}")
        text.completion_tokens = reply.usage.completion_tokens if reply.usage else None
        return text

    def ask(questions: list[str], max_tokens: int, seed: int) -> list[str]:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:  # map keeps the questions' order
            return list(pool.map(lambda iq: one(iq[1], max_tokens, seed + iq[0]), enumerate(questions)))

    return ask


def _said(e: openai.APIStatusError) -> str:
    """What the server said of a refusal: its error's message (OpenAI's shape), else the start of its body as text (a
    Python bytes literal had been shown)."""
    body = e.body if isinstance(e.body, dict) else {}
    error = body.get("error", body)
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"][:300]
    return e.response.content[:300].decode("utf-8", "replace")

"""Model providers behind one small interface.

`LLM_PROVIDER` picks one of:
- `anthropic`: Claude through `anthropic.Anthropic`;
- `bedrock`: Claude on AWS Bedrock through `anthropic.AnthropicBedrock`;
- `openai`: any OpenAI-compatible Chat Completions endpoint;
- `echo`: an offline stand-in that repeats the user's message and says it is
  not a real model (the default when no API key is configured).

Credentials and endpoints come from each SDK's own environment variables
(`ANTHROPIC_API_KEY`, `ANTHROPIC_BASE_URL`, `OPENAI_API_KEY`,
`OPENAI_BASE_URL`, `AWS_*`), exactly as the SDKs document them.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import anthropic
import openai

from conversation_memory import USER, estimate_tokens

ECHO_LABEL = "[echo model: not a real LLM, no API key configured]"
ECHO_CHOSEN_LABEL = "[echo model: not a real LLM, chosen with LLM_PROVIDER=echo]"


@dataclass(frozen=True)
class ModelReply:
    text: str
    model: str
    input_tokens: int
    output_tokens: int
    stop_reason: str | None = None

    @property
    def usage(self) -> dict[str, int]:
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens}


class ModelError(Exception):
    """The provider failed; `status` is the HTTP status Parley answers with."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message


class ChatModel(Protocol):
    provider: str
    model: str

    def reply(self, system: str | None, messages: list[dict[str, str]]) -> ModelReply: ...


class AnthropicModel:
    """Claude via the Messages API, direct or on Bedrock."""

    def __init__(self, client: anthropic.Anthropic | anthropic.AnthropicBedrock, provider: str, config: Mapping[str, Any]) -> None:
        self.client = client
        self.provider = provider
        self.model = config["LLM_MODEL"]
        self.max_tokens = config["LLM_MAX_TOKENS"]
        self.temperature = config["LLM_TEMPERATURE"]

    def reply(self, system: str | None, messages: list[dict[str, str]]) -> ModelReply:
        options: dict[str, Any] = {"system": system} if system else {}
        if self.temperature is not None:
            # This SDK release has no `temperature` argument (newer Claude
            # models fix it); models that still take one get it in the body.
            options["extra_body"] = {"temperature": self.temperature}
        try:
            response = self.client.messages.create(
                model=self.model, max_tokens=self.max_tokens, messages=messages, **options
            )
        except anthropic.APIError as exc:
            raise _provider_error(exc, anthropic, self.provider) from exc
        text = "".join(block.text for block in response.content if block.type == "text")
        return ModelReply(
            text=_storable_reply(text, self.provider),
            model=response.model,
            input_tokens=response.usage.input_tokens,
            output_tokens=response.usage.output_tokens,
            stop_reason=response.stop_reason,
        )


class OpenAIModel:
    """Any endpoint that speaks OpenAI's Chat Completions."""

    provider = "openai"

    def __init__(self, client: openai.OpenAI, config: Mapping[str, Any]) -> None:
        self.client = client
        self.model = config["LLM_MODEL"]
        self.max_tokens = config["LLM_MAX_TOKENS"]
        self.temperature = config["LLM_TEMPERATURE"]

    def reply(self, system: str | None, messages: list[dict[str, str]]) -> ModelReply:
        prompt = ([{"role": "system", "content": system}] if system else []) + messages
        options: dict[str, Any] = {} if self.temperature is None else {"temperature": self.temperature}
        try:
            # max_tokens rather than max_completion_tokens: most compatible
            # servers (vLLM, Ollama, LiteLLM) only know the former.
            response = self.client.chat.completions.create(
                model=self.model, messages=prompt, max_tokens=self.max_tokens, **options
            )
        except openai.APIError as exc:
            raise _provider_error(exc, openai, self.provider) from exc
        if not response.choices:
            raise ModelError(502, "model_error", "the openai model returned no choices")
        choice = response.choices[0]
        usage = response.usage
        return ModelReply(
            text=_storable_reply(choice.message.content or "", self.provider),
            model=response.model,
            input_tokens=usage.prompt_tokens if usage else 0,
            output_tokens=usage.completion_tokens if usage else 0,
            stop_reason=choice.finish_reason,
        )


class EchoModel:
    """Offline stand-in: answers with the user's own words, clearly labelled."""

    provider = "echo"
    model = "echo"

    def __init__(self, label: str = ECHO_LABEL) -> None:
        self.label = label

    def reply(self, system: str | None, messages: list[dict[str, str]]) -> ModelReply:
        last_user = next((m["content"] for m in reversed(messages) if m["role"] == USER), "")
        text = f"{self.label} You said: {last_user}"
        prompt_tokens = sum(estimate_tokens(m["content"]) for m in messages)
        if system:
            prompt_tokens += estimate_tokens(system)
        return ModelReply(
            text=text,
            model=self.model,
            input_tokens=prompt_tokens,
            output_tokens=estimate_tokens(text),
            stop_reason="end_turn",
        )


def make_model(config: Mapping[str, Any]) -> ChatModel:
    """Build the configured provider. SDK clients read their own env vars."""
    provider = config["LLM_PROVIDER"]
    client_options = {"timeout": config["LLM_TIMEOUT_SECONDS"], "max_retries": config["LLM_MAX_RETRIES"]}
    if provider == "anthropic":
        return AnthropicModel(anthropic.Anthropic(**client_options), provider, config)
    if provider == "bedrock":
        return AnthropicModel(anthropic.AnthropicBedrock(**client_options), provider, config)
    if provider == "openai":
        return OpenAIModel(openai.OpenAI(**client_options), config)
    if provider == "echo":
        return EchoModel(ECHO_CHOSEN_LABEL if config.get("LLM_PROVIDER_CHOSEN") else ECHO_LABEL)
    raise ValueError(f"unknown LLM_PROVIDER {provider!r}")


def _storable_reply(text: str, provider: str) -> str:
    """The reply as it can be stored and sent back next turn, or a 502.

    PostgreSQL refuses NUL characters and providers refuse empty assistant
    turns, so an empty reply is a failed turn, not a stored one.
    """
    text = text.replace("\x00", "").encode("utf-8", errors="replace").decode("utf-8")
    if not text.strip():
        raise ModelError(502, "model_error", f"the {provider} model returned an empty reply")
    return text


def _provider_error(exc: Exception, sdk: Any, provider: str) -> ModelError:
    """Translate an SDK exception into the status Parley should answer with."""
    if isinstance(exc, sdk.APITimeoutError):
        return ModelError(504, "model_timeout", f"the {provider} model did not answer in time")
    if isinstance(exc, sdk.APIConnectionError):
        return ModelError(503, "model_unavailable", f"could not connect to the {provider} model")
    status = getattr(exc, "status_code", None)
    if status in (429, 529):
        return ModelError(503, "model_unavailable", f"the {provider} model is overloaded or rate limited; retry later")
    return ModelError(502, "model_error", f"the {provider} model failed (upstream status {status})")

"""OpenAI's legacy completions protocol over the Engine: the request, its SamplingParams, the answer.

Tokens are characters. What OpenAI clients rely on holds exactly: a stop string is left out of
the text, streamed or not (vLLM's `include_stop_str_in_output` opts in); `logprobs` has the legacy
shape (tokens, token_logprobs, top_logprobs with the chosen character, text_offset into the
returned text) from the model's raw distribution, 0-5 as OpenAI and up to the vocabulary as an
extension; `echo` returns the prompt first (with its log-probabilities when asked: the first
character has none, as OpenAI's); `stream_options.include_usage` adds a last chunk with usage;
`logit_bias` maps character ids to biases. A field that would change the result and is not
supported (best_of > 1, suffix, penalties) is refused naming it, never ignored.

Extensions for a recurrent model: `"return_state": true` gives each choice a `state`, a signed
continuation token (tokens.py); a request with `"state": TOKEN` goes on from there (its prompt, if
any, fed after it): with the same settings, exactly the text one longer request would have given.
`usage.prompt_tokens_details.cached_tokens` counts the prompt characters the prefix cache restored.
"""

import asyncio
import json
import logging
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from charrnn_runtime.errors import CharrnnError
from charrnn_runtime.params import SamplingParams

from .security import openai_error

log = logging.getLogger("charrnn_serve")

DEFAULT_MAX_TOKENS = 256  # characters; OpenAI's 16 would be a few words
MAX_CHOICES = 64


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """OpenAI's completions fields (and vLLM's top_k, include_stop_str_in_output); others are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")  # strict: "1" is not a number, true not an int

    model: str | None = None
    prompt: str | list[str] = ""
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    include_stop_str_in_output: bool = False
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = None
    echo: bool = False
    logit_bias: dict[str, float] | None = None
    return_state: bool = False
    state: str | None = None
    # OpenAI's, refused unless they ask for nothing (see UNSUPPORTED)
    best_of: int | None = None
    suffix: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    @model_validator(mode="before")
    @classmethod
    def null_means_default(cls, data):
        """OpenAI's API allows null for every optional field."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


# field: (the values that ask for nothing, why it cannot be had)
UNSUPPORTED = {"best_of": ((None, 1), "best_of > 1 is not supported: use n and pick"),
               "suffix": ((None, ""), "suffix (insertion) is not supported by a left-to-right character model"),
               "presence_penalty": ((None, 0), "presence_penalty is not supported"),
               "frequency_penalty": ((None, 0), "frequency_penalty is not supported")}


def sampling_params(body: CompletionRequest) -> SamplingParams:
    """The request's SamplingParams (CharrnnError naming the field when a value is refused)."""
    for field, (neutral, why) in UNSUPPORTED.items():
        if getattr(body, field) not in neutral:
            raise CharrnnError(why, field)
    if body.stream_options is not None and not body.stream:
        raise CharrnnError("stream_options needs stream: true", "stream_options")
    try:
        bias = {int(key): value for key, value in (body.logit_bias or {}).items()}
    except ValueError:
        raise CharrnnError("logit_bias keys must be character ids (see /tokenize)", "logit_bias") from None
    return SamplingParams(body.temperature, body.top_k, body.top_p, body.seed, body.stop, body.max_tokens,
                          include_stop=body.include_stop_str_in_output, logprobs=body.logprobs,
                          prompt_logprobs=body.logprobs if body.echo else None, logit_bias=bias)


def prompt_of(body: CompletionRequest) -> str:
    if isinstance(body.prompt, str):
        return body.prompt
    if len(body.prompt) != 1:
        raise CharrnnError(f"one prompt per request, got a list of {len(body.prompt)}", "prompt")
    return body.prompt[0]


class Choice:
    """What one choice has sent so far of its returned text (the prompt first with echo), so the
    response, or each streamed chunk, carries the next piece with its log-probabilities."""

    def __init__(self, index: int, request, prompt: str, echo: bool, state_token=None) -> None:
        self.index, self.request, self.prompt, self.echo = index, request, prompt, echo
        self.state_token = state_token  # continuation → token, when the client asked for the state
        self.sent = 0  # generated characters sent
        self.offset = 0  # characters of the returned text sent (text_offset of the next one)

    def piece(self, chunk: str, finish_reason: str | None = None) -> dict:
        """The choice object for `chunk`, the generated text after what was sent (the prompt goes
        with the first piece)."""
        sequence = self.request.sequence
        entries = sequence.logprobs[self.sent:self.sent + len(chunk)]
        self.sent += len(chunk)
        if self.echo and self.offset == 0:
            chunk, entries = self.prompt + chunk, sequence.prompt_logprobs + entries
        logprobs = None if sequence.params.logprobs is None else self._logprobs(chunk, entries)
        self.offset += len(chunk)
        piece = {"text": chunk, "index": self.index, "logprobs": logprobs, "finish_reason": finish_reason}
        if finish_reason is not None and self.state_token is not None and self.request.continuation is not None:
            piece["state"] = self.state_token(self.request.continuation)
        return piece

    def _logprobs(self, text: str, entries: list) -> dict:
        return {"tokens": list(text),
                "token_logprobs": [None if e is None else e[0] for e in entries],
                "top_logprobs": [None if e is None else e[1] for e in entries],
                "text_offset": list(range(self.offset, self.offset + len(text)))}


def usage(prompt: str, requests) -> dict:
    """Characters: the prompt's (fed once for all choices; cached_tokens of them restored from the
    prefix cache) and the generated ones (stop strings included)."""
    generated = sum(len(r.sequence.chars) for r in requests)
    return {"prompt_tokens": len(prompt), "completion_tokens": generated, "total_tokens": len(prompt) + generated,
            "prompt_tokens_details": {"cached_tokens": requests[0].sequence.cached}}


def choices(body: CompletionRequest, prompt: str, requests, state_token) -> list[Choice]:
    return [Choice(i, r, prompt, body.echo, state_token if body.return_state else None) for i, r in enumerate(requests)]


def response(head: dict, body: CompletionRequest, prompt: str, requests, seed: int, state_token) -> dict:
    """The whole answer of finished requests."""
    pieces = [c.piece(c.request.sequence.text, c.request.finish_reason)
              for c in choices(body, prompt, requests, state_token)]
    return {**head, "seed": seed, "choices": pieces, "usage": usage(prompt, requests)}


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def stream_events(head: dict, body: CompletionRequest, prompt: str, requests, state_token):
    """Server-sent events of the choices' engine requests, ending with [DONE].

    Each event carries what a choice's row produced since its last event (the engine coalesces
    characters), and a final event per choice its finish_reason. One choice is read directly; several
    are merged as they come. The event's fixed part is encoded once per response, not per event.
    Leaving early (the client went away) cancels the requests, which frees their rows."""
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    chunk_head = json.dumps({**head, "usage": None} if include_usage else head, ensure_ascii=False)
    start, end = f'data: {chunk_head[:-1]},"choices":[', "]}\n\n"
    streams = [choice_pieces(choice) for choice in choices(body, prompt, requests, state_token)]
    try:
        async for piece in streams[0] if len(streams) == 1 else merged(streams):
            yield start + json.dumps(piece, ensure_ascii=False) + end
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(prompt, requests)})
        yield "data: [DONE]\n\n"
    except CharrnnError as e:  # what the client may read (e.g. the engine stopped): the stream's last event
        yield sse(openai_error(str(e), "server_error"))
    except Exception:  # noqa: BLE001 - a bug: logged here, a generic last event there
        log.exception("streaming a completion failed")
        yield sse(openai_error("internal server error", "server_error"))
    finally:
        for request in requests:
            request.cancel()


async def choice_pieces(choice: Choice):
    """A choice's pieces as its request produces them, then its finish_reason."""
    async for chunk in choice.request:
        yield choice.piece(chunk)
    yield choice.piece("", choice.request.finish_reason)


async def merged(streams):
    """The items of several async iterators as they come; an error in one ends it all."""
    queue, done = asyncio.Queue(), object()

    async def pump(stream):
        try:
            async for item in stream:
                queue.put_nowait(item)
            queue.put_nowait(done)
        except Exception as e:  # noqa: BLE001 - raised to the reader below
            queue.put_nowait(e)

    tasks = [asyncio.ensure_future(pump(stream)) for stream in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item is done:
                remaining -= 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

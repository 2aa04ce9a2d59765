"""CPU of one model call: Parley's `AnthropicModel.reply` against the SDK's own `messages.create`.

Each sends the same context to the fake Claude server (in a process of its
own, so its CPU is not counted) through the same client, one call at a time,
in interleaved rounds; the figure is this process's CPU time per call:
- `messages.create`: the SDK copies and encodes the context with the
  standard library and builds its typed `Message` (the baseline);
- `post`, typed: the body encoded by orjson, the reply still built into the
  typed `Message` (Parley's call before it read replies as JSON);
- `AnthropicModel.reply`: orjson both ways (Parley's call).

    python -m bench.model_call [--calls 3000] [--rounds 3] [--messages 21]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import anthropic
import orjson

from bench.serving import fake_model
from config import load_config
from llm import AnthropicModel, make_model


def cpu_per_call(call: Callable[[], object], calls: int) -> float:
    """Milliseconds of this process's CPU per call, after a warm-up."""
    for _ in range(calls // 10):
        call()
    started = time.process_time()
    for _ in range(calls):
        call()
    return (time.process_time() - started) / calls * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=21, help="messages in the context")
    options = parser.parse_args()
    messages = [{"role": ("user", "assistant")[n % 2], "content": f"message number {n} of the context"}
                for n in range(options.messages)]
    with fake_model(0.0) as url:
        settings = {"LLM_PROVIDER": "anthropic", "LLM_MODEL": "claude-bench", "ANTHROPIC_API_KEY": "sk-bench",
                    "ANTHROPIC_BASE_URL": url}
        os.environ.update(settings)  # the SDK reads its own variables
        model = make_model(load_config(settings))
        assert isinstance(model, AnthropicModel)
        body = {"model": model.model, "max_tokens": model.max_tokens, "messages": messages}
        setups = {
            "messages.create (the SDK's way)": lambda: model.client.messages.create(**body),
            "post, typed Message": lambda: model.client.post(
                "/v1/messages", content=orjson.dumps(body), cast_to=anthropic.types.Message),
            "AnthropicModel.reply (Parley)": lambda: model.reply(None, messages),
        }
        figures: dict[str, list[float]] = {name: [] for name in setups}
        for round_number in range(1, options.rounds + 1):
            for name, call in setups.items():
                figures[name].append(cpu_per_call(call, options.calls))
                print(f"round {round_number} {name:<34} {figures[name][-1]:.3f} ms CPU per call")
    baseline = statistics.median(figures["messages.create (the SDK's way)"])
    print(f"\nmedians, {options.messages} messages a call, against messages.create:")
    for name, values in figures.items():
        print(f"  {name:<34} {statistics.median(values):.3f} ms  {statistics.median(values) / baseline:.2f}x")


if __name__ == "__main__":
    main()

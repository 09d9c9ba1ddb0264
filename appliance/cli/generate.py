"""`appliance generate`: stream a completion from the local engine to the terminal."""

from __future__ import annotations

import argparse
import sys
import time

from appliance.cli.repl import prompt_lines
from appliance.engine.core import default_threads
from appliance.engine.engine import Engine
from appliance.engine.sampling import SamplingOptions
from appliance.models.manifest import ManifestError
from appliance.models.modelref import resolve_model


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a prompt with the local model",
        description="Stream a continuation of PROMPT from a local GGUF model run by the native core. "
        "The default model is provisioned by `appliance models pull`.",
    )
    p.add_argument("prompt", nargs="?", help="the prompt text ('-' reads it from standard input)")
    p.add_argument("--interactive", "-i", action="store_true", help="read prompts line by line until EOF or 'exit'")
    p.add_argument("--model", "-m", default=None, help="model name from the manifest or a path to a .gguf file")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-tokens", "-n", type=int, default=128, help="most tokens to generate (default 128)")
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default), higher = more random")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop when this text appears (repeatable)")
    p.add_argument("--threads", type=int, default=None, help=f"CPU threads (default {default_threads()})")
    p.add_argument("--ctx", type=int, default=4096, help="context size in tokens (default 4096)")
    p.add_argument("--stats", action="store_true", help="print token counts and speed to stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.prompt is None and not args.interactive:
        print("appliance generate: give a PROMPT or --interactive", file=sys.stderr)
        return 2
    try:
        engine = Engine(resolve_model(args.model), n_ctx=args.ctx, n_threads=args.threads)
        opts = SamplingOptions(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            repeat_penalty=args.repeat_penalty,
            seed=args.seed,
            stop=tuple(args.stop),
        )
        opts.validate()
        if not args.interactive:
            prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
            _answer(engine, prompt, opts, args.chat, args.stats)
            return 0
        print(
            f"model {engine.model.path} ({engine.model.arch}); type a prompt, 'exit' or Ctrl-D to quit", file=sys.stderr
        )
        for line in prompt_lines():
            _answer(engine, line, opts, args.chat, args.stats)
        return 0
    except (ValueError, LookupError, OSError, ManifestError) as e:
        print(f"appliance generate: {e}", file=sys.stderr)
        return 2


def _answer(engine: Engine, prompt: str, opts: SamplingOptions, chat: bool, stats: bool) -> None:
    if chat:
        prompt = engine.apply_chat_template([{"role": "user", "content": prompt}])
    t0 = time.perf_counter()
    n = 0
    finish = None
    for chunk in engine.generate(prompt, opts):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        n += chunk.token is not None
        finish = chunk.finish_reason
    sys.stdout.write("\n")
    if stats:
        dt = time.perf_counter() - t0
        print(f"[{n} tokens in {dt:.2f} s, {n / dt:.1f} tokens/s, finish: {finish}]", file=sys.stderr)

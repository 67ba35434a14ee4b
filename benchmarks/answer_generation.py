"""Answer generation against the local Gemini-protocol server.

Prints the speed-up of the configured concurrency over one-at-a-time calls
(target >= 10x) and the number of model calls on a second, cached run (target 0).

    python benchmarks/answer_generation.py [--questions 200] [--latency 0.2] [--concurrency 16]
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

from router_pipeline.labels.answering import generate_answers
from router_pipeline.llm.fake_gemini import FakeGemini
from router_pipeline.llm import RoleSpec, make_client
from router_pipeline.llm.cache import ResponseCache
from router_pipeline.labels.questions import load_questions
from router_pipeline.llm.roles import Roles


def run(questions, fake, concurrency, cache):
    roles = {"medium": RoleSpec("gemini", "gemini-2.5-flash")}
    clients = {"medium": make_client(roles["medium"], gemini_base_url=fake.base_url)}
    t0 = time.perf_counter()
    frame, stats = generate_answers(questions, roles, clients, cache, concurrency=concurrency, progress=False)
    return time.perf_counter() - t0, stats["medium"], frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=Roles.__dataclass_fields__["concurrency"].default)
    args = parser.parse_args()
    os.environ.setdefault("GEMINI_API_KEY", "benchmark-key")
    questions, _ = load_questions(sample_size=args.questions)
    questions = questions.assign(split="train")
    with tempfile.TemporaryDirectory() as tmp, FakeGemini(latency_s=args.latency) as fake:
        serial_s, serial, _ = run(questions, fake, 1, None)
        cache = ResponseCache(Path(tmp) / "cache.sqlite")
        par_s, par, _ = run(questions, fake, args.concurrency, cache)
        again_s, again, _ = run(questions, fake, args.concurrency, cache)
    n = len(questions)
    print(f"questions: {n}, injected latency: {args.latency * 1000:.0f} ms, concurrency: {args.concurrency}")
    print(f"one at a time:        {serial_s:6.2f} s  ({serial.calls} calls, {n / serial_s:6.1f} answers/s)")
    print(f"concurrency {args.concurrency:<3}:      {par_s:6.2f} s  ({par.calls} calls, {n / par_s:6.1f} answers/s)")
    print(f"speed-up:             {serial_s / par_s:6.1f}x  (target >= 10x)")
    print(f"second run:           {again_s:6.2f} s  ({again.calls} model calls, {again.cache_hits} cache hits; target 0 calls)")


if __name__ == "__main__":
    main()

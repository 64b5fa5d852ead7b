"""Shared driver for the fuzz harnesses: atheris when importable, else a bounded random loop.

A harness is a function ``test_one_input(data: bytes) -> None`` whose rule is "parse, or raise
the documented exception; anything else is a bug". It catches the documented exception itself,
so any exception escaping it (or an ``AssertionError`` from its invariants) is a finding.

The fallback loop is a small mutational fuzzer: it starts from seed inputs, applies random
byte-level mutations (flip, insert, delete, duplicate, splice, truncate, insert an
interesting token) and also tries purely random bytes. It is no match for libFuzzer's
coverage guidance, but it needs nothing beyond the standard library and is reproducible
from ``--seed``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as `python fuzz/x.py` without installing the package
    sys.path.insert(0, str(REPO_ROOT))

try:
    import atheris  # type: ignore[import-not-found, unused-ignore]
except ImportError:
    atheris = None

__all__ = ["REPO_ROOT", "Harness", "atheris", "main", "random_loop"]

Harness = Callable[[bytes], None]


def _mutate(
    rng: random.Random, data: bytes, seeds: Sequence[bytes], tokens: Sequence[bytes]
) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        pos = rng.randint(0, len(buf))
        if op == 0 and buf:  # flip bits in one byte
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1:  # insert random bytes
            buf[pos:pos] = rng.randbytes(rng.randint(1, 4))
        elif op == 2 and buf:  # delete a run
            del buf[pos : pos + rng.randint(1, 8)]
        elif op == 3 and buf:  # duplicate a run
            start = rng.randrange(len(buf))
            buf[pos:pos] = buf[start : start + rng.randint(1, 16)]
        elif op == 4:  # insert an interesting token
            buf[pos:pos] = rng.choice(tokens)
        elif op == 5 and buf:  # truncate
            del buf[rng.randrange(len(buf)) :]
        elif op == 6:  # splice with another seed
            other = rng.choice(seeds)
            buf = buf[:pos] + other[rng.randint(0, len(other)) :]
        elif op == 7 and buf:  # overwrite one byte with an edge value
            buf[rng.randrange(len(buf))] = rng.choice((0x00, 0x0A, 0x0D, 0x7F, 0x80, 0xFF))
    return bytes(buf)


def random_loop(
    harness: Harness,
    seeds: Sequence[bytes],
    tokens: Sequence[bytes],
    iterations: int,
    seed: int,
    max_len: int,
) -> int:
    rng = random.Random(seed)  # noqa: S311 - reproducible test inputs, not secrets
    corpus = list(seeds) or [b""]
    started = time.monotonic()
    for i in range(iterations):
        if rng.random() < 0.1:
            data = rng.randbytes(rng.randint(0, 64))
        else:
            data = _mutate(rng, rng.choice(corpus), corpus, tokens)[:max_len]
        try:
            harness(data)
        except Exception:
            print(
                f"FAILED at iteration {i} (seed {seed}); input hex:\n{data.hex()}", file=sys.stderr
            )
            raise
        if len(corpus) < 4096 and rng.random() < 0.01:
            corpus.append(data)  # keep some mutants so mutations compound
    elapsed = time.monotonic() - started
    print(f"ok: {iterations} inputs in {elapsed:.1f}s, no findings (seed {seed})")
    return 0


def main(
    harness: Harness,
    seeds: Sequence[bytes],
    tokens: Sequence[bytes],
    argv: Sequence[str] | None = None,
    max_len: int = 4096,
) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        description="Fuzz harness. Without --iterations/--random and with atheris installed, "
        "the remaining arguments go to libFuzzer (e.g. -runs=100000 corpus_dir/)."
    )
    parser.add_argument("--iterations", type=int, help="run the built-in random loop N times")
    parser.add_argument(
        "--random", action="store_true", help="use the random loop even with atheris"
    )
    parser.add_argument("--seed", type=int, default=0, help="random loop seed (default 0)")
    args, rest = parser.parse_known_args(argv)
    if atheris is not None and args.iterations is None and not args.random:
        atheris.Setup([sys.argv[0], *rest], harness)
        atheris.Fuzz()
        return 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return random_loop(harness, seeds, tokens, args.iterations or 100_000, args.seed, max_len)

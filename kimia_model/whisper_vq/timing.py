"""The timing contract of the Whisper+VQ tokens, documented once and relied on by the
tokenizer, the tokenize stage, the writer and the Kimi-Audio export.

Audio is 16 kHz mono. It is cut into consecutive 30 s windows of 480 000 samples (the last
one shorter). A window of ``L`` samples yields ``ceil(L / 1280)`` tokens. Since 480 000 is
a multiple of 1280 (375 tokens), token ``k`` of an utterance always covers samples
``[1280 k, min(1280 (k + 1), N))`` and an utterance of ``N`` samples yields exactly
``ceil(N / 1280)`` tokens (0 for empty audio). Continuous features have the same length:
row ``k`` concatenates the four 50 Hz encoder frames ``4k .. 4k+3`` (``[T, 4 D]``).

>>> token_count(0), token_count(1), token_count(1280), token_count(1281), token_count(480001)
(0, 1, 1, 2, 376)
"""

from __future__ import annotations

SAMPLE_RATE = 16_000
#: conv1 stride (1) x conv2 stride (2) x pooling (4) x hop (160): audio samples per token.
SAMPLES_PER_TOKEN = 1280
WINDOW_SECONDS = 30
WINDOW_SAMPLES = WINDOW_SECONDS * SAMPLE_RATE
TOKENS_PER_WINDOW = WINDOW_SAMPLES // SAMPLES_PER_TOKEN  # 375
TOKEN_RATE_HZ = SAMPLE_RATE / SAMPLES_PER_TOKEN  # 12.5
#: 50 Hz encoder frames per token (average pooling 50 Hz -> 12.5 Hz).
POOL = 4


def window_bounds(n_samples: int) -> list[tuple[int, int]]:
    """``(start, end)`` sample bounds of the consecutive 30 s windows of ``n_samples`` samples.

    >>> window_bounds(480001)
    [(0, 480000), (480000, 480001)]
    """
    return [(s, min(s + WINDOW_SAMPLES, n_samples)) for s in range(0, max(n_samples, 0), WINDOW_SAMPLES)]


def tokens_in_window(length: int) -> int:
    """Tokens of one window of ``length`` samples: ``ceil(length / 1280)`` (upstream ``(L-1)//1280+1``)."""
    return -(-length // SAMPLES_PER_TOKEN) if length > 0 else 0


def token_count(n_samples: int) -> int:
    """Exact token count of an utterance of ``n_samples`` 16 kHz samples (sum over its windows)."""
    return sum(tokens_in_window(e - s) for s, e in window_bounds(n_samples))


def token_span(k: int, n_samples: int) -> tuple[int, int]:
    """Sample range ``[start, end)`` token ``k`` of an ``n_samples`` utterance stands for."""
    if not 0 <= k < token_count(n_samples):
        raise IndexError(f"token {k} out of range for {n_samples} samples")
    return k * SAMPLES_PER_TOKEN, min((k + 1) * SAMPLES_PER_TOKEN, n_samples)

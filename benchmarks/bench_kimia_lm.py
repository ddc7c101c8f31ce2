"""Kimi-Audio LM decode speed on random checkpoints in the upstream layout.

Prints, per device and configuration, prefill tokens/s and decode steps/s for the
text-only mode (trunk only) and the text+audio mode (trunk + audio branch, both heads),
measured through the real generation loop (sampling included). CUDA runs too when a GPU
is visible.

    .venv/bin/python benchmarks/bench_kimia_lm.py [--threads 1] [--steps 64] [--configs tiny,small]

Not a test: figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny-model factories

from factories import tiny_config_dict, write_random_checkpoint, write_tiktoken_files  # noqa: E402
from kimia_model.kimia_generate import KimiaGenerator, SamplingParams  # noqa: E402

CONFIGS = {
    # The tests' configuration.
    "tiny": {},
    # Wider and deeper (about 1/7 of the release's width, 1/3 of its depth), 4096 audio codes.
    "small": dict(
        hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=2, kimia_mimo_layers=2, kimia_mimo_transformer_from_layer_index=5,
        num_audio_codes=4096, kimia_adaptor_input_dim=256,
    ),
}  # fmt: skip


def _codes(n: int):
    return lambda wav: (np.arange(int(np.ceil(len(wav) / 1280))) % n).astype(np.int32)


def bench(model_dir: Path, device: str, steps: int, n_codes: int, feat_dim: int) -> dict[str, float]:
    gen = KimiaGenerator.from_pretrained(
        model_dir,
        device=device,
        dtype="float32",
        audio_tokenizer=_codes(n_codes),
        feature_extractor=lambda wav: np.zeros((int(np.ceil(len(wav) / 1280)), feat_dim), np.float32),
    )
    wav = np.random.default_rng(0).standard_normal(16000 * 8).astype(np.float32) * 0.1  # 8 s -> 100 tokens
    msgs = [
        {"role": "user", "message_type": "text", "content": "transcribe"},
        {"role": "user", "message_type": "audio", "content": wav},
    ]
    out: dict[str, float] = {}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for mode in ("text", "both"):
        prompt = gen.prompts.build(msgs, output=mode)
        # Warm-up (allocator, kernels), then timed: a prefill-only call and a full decode.
        gen.generate_from_prompt(prompt, output=mode, max_new_tokens=4)
        sync()
        t0 = time.perf_counter()
        gen.generate_from_prompt(prompt, output=mode, max_new_tokens=1)
        sync()
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = gen.generate_from_prompt(
            prompt, output=mode, max_new_tokens=steps,
            text_sampling=SamplingParams(temperature=0.0), audio_sampling=SamplingParams(temperature=0.8, top_k=10),
        )  # fmt: skip
        sync()
        total = time.perf_counter() - t0
        decode_steps = res.steps - 1
        out[f"{mode}_prefill_tok_s"] = len(prompt) / prefill
        out[f"{mode}_decode_steps_s"] = decode_steps / max(total - prefill, 1e-9)
        out[f"{mode}_steps"] = res.steps
        out["prompt_len"] = len(prompt)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--configs", default="tiny,small")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, threads={args.threads}, decode steps={args.steps}")
    print("a decode step = one text token + one audio token (both streams advance together)")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            overrides = dict(CONFIGS[name])
            cfg = tiny_config_dict(**overrides)
            d = Path(tmp) / name
            write_tiktoken_files(d, ["transcribe"], num_base_tokens=512)
            write_random_checkpoint(d, cfg, seed=0)
            for dev in devices:
                r = bench(d, dev, args.steps, cfg["vocab_size"] - cfg["kimia_token_offset"], cfg["kimia_adaptor_input_dim"])
                print(
                    f"{name:5s} {dev:4s} prompt={int(r['prompt_len'])} | text mode: prefill "
                    f"{r['text_prefill_tok_s']:8.0f} tok/s, decode {r['text_decode_steps_s']:7.1f} steps/s | "
                    f"both mode: prefill {r['both_prefill_tok_s']:8.0f} tok/s, decode "
                    f"{r['both_decode_steps_s']:7.1f} steps/s ({int(r['both_steps'])} steps)"
                )


if __name__ == "__main__":
    main()

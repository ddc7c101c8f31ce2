"""Whisper+VQ semantic tokenizer (GLM-4-Voice ``WhisperVQEncoder``) at exactly 12.5 Hz.

Kimi-Audio's discrete audio tokens come from GLM-4-Voice's ``WhisperVQEncoder``: the first 16
layers of a fine-tuned whisper-large-v3 encoder, average pooling by 4 (50 Hz -> 12.5 Hz) and a
nearest-neighbour lookup in a 16384 x 1280 codebook (GLM-4-Voice's speech tokenizer). This package
re-implements that encoder natively so that:

* the upstream Hugging Face directory (``config.json`` + ``model.safetensors``) loads with its
  own parameter names and **without** ``trust_remote_code``;
* any plain Whisper checkpoint (openai-whisper ``.pt``, Hugging Face Whisper directory, or a
  CTranslate2/faster-whisper directory, whose ``model.bin`` we parse ourselves) plus a codebook
  fitted by :mod:`kimia_model.codebook` gives the same kind of tokens offline;
* the continuous Whisper features Kimi-Audio feeds its LLM (§1.7) come out of the same pass,
  grouped by 4 frames so that they line up one-to-one with the tokens.

The package is split by concern, and callers import the submodule they need:

* :mod:`kimia_model.whisper_vq.timing`: the 12.5 Hz timing contract (numbers only, no torch);
* :mod:`kimia_model.whisper_vq.model`: the log-mel front-end, the configuration and the encoder;
* :mod:`kimia_model.whisper_vq.loaders`: checkpoint readers (upstream or Hugging Face directory,
  openai-whisper ``.pt``, CTranslate2 ``model.bin``);
* :mod:`kimia_model.whisper_vq.codebook_file`: the codebook files :mod:`kimia_model.codebook` writes;
* :mod:`kimia_model.whisper_vq.tokenizer`: windows, padding and batching: audio in, tokens and
  aligned features out.

This file imports nothing, so reading the timing contract never loads torch.
"""

"""WER and CER with known values: Chinese, full-width forms, traditional script, mixed CJK and Latin."""

from __future__ import annotations

import pytest

from stages.textnorm import (
    cer,
    char_edits,
    corpus_cer,
    corpus_wer,
    is_unspaced,
    normalize_chars,
    primary_metric,
    wer,
)


def test_cer_known_values() -> None:
    assert cer("今天天气很好", "今天天汽很好") == pytest.approx(1 / 6)  # one substitution
    assert cer("今天天气很好", "今天气很好") == pytest.approx(1 / 6)  # one deletion
    assert cer("今天天气很好", "今天天气真的很好") == pytest.approx(2 / 6)  # two insertions
    assert cer("今天天气很好", "") == 1.0
    assert cer("", "") == 0.0 and cer("。", "") == 0.0 and cer("", "好") == 1.0
    assert char_edits("我们明天见", "我们后天见吧") == (2, 5)


def test_full_width_and_half_width_are_equal() -> None:
    assert cer("你好，世界！", "你好,世界!") == 0.0
    assert cer("ＡＢＣ１２３", "abc123") == 0.0
    assert cer("「你好」、他说。", "你好 他说") == 0.0
    assert normalize_chars("Ｈｅｌｌｏ，　世界。") == "hello世界"


def test_traditional_and_simplified() -> None:
    assert cer("今天天气很好", "今天天氣很好") == 0.0  # documented: script is not scored by default
    assert cer("今天天气很好", "今天天氣很好", simplified=False) == pytest.approx(1 / 6)
    assert normalize_chars("語言識別") == "语言识别"


def test_mixed_cjk_and_latin() -> None:
    ref = "我用 Python 写代码"
    assert cer(ref, "我用python写代码") == 0.0  # case and spaces do not count
    assert cer(ref, "我用 Pithon 写代码") == pytest.approx(1 / 11)  # 5 hanzi + 6 letters, 1 wrong
    # Number words normalise as in WER, symmetrically.
    assert cer("我有 three 个", "我有3个") == 0.0
    assert primary_metric(None, ref) == "cer" and primary_metric(None, "I use Python to code") == "wer"


def test_english_cer_beside_wer() -> None:
    assert wer("the cat sat", "the cat sit") == pytest.approx(1 / 3)
    assert cer("the cat sat", "the cat sit") == pytest.approx(1 / 9)  # spaces are not characters


def test_corpus_rates_weigh_by_length() -> None:
    assert corpus_cer(["今天天气很好", "好"], ["今天天汽很好", "坏"]) == pytest.approx(2 / 7)
    assert corpus_wer(["a b c d", "e"], ["a b c d", "f"]) == pytest.approx(1 / 5)
    assert corpus_cer([], []) == 0.0
    with pytest.raises(ValueError):
        corpus_cer(["a"], [])


@pytest.mark.parametrize(("language", "unspaced"), [("zh", True), ("ja", True), ("ko", True), ("yue", True),
                                                    ("en", False), ("es", False), ("zh-CN", True)])
def test_unspaced_languages(language: str, unspaced: bool) -> None:
    assert is_unspaced(language) is unspaced
    assert primary_metric(language) == ("cer" if unspaced else "wer")


def test_eval_transcripts_command(tmp_path, capsys) -> None:
    import json

    from pipeline.cli import main

    ref, hyp = tmp_path / "ref.jsonl", tmp_path / "hyp.jsonl"
    ref.write_text('{"id": "a", "text": "今天天气很好。", "language": "zh"}\n{"id": "b", "text": "The cat sat."}\n',
                   encoding="utf-8")
    hyp.write_text('{"id": "a", "text": "今天天汽很好"}\n{"id": "b", "text": "the cat sat"}\n', encoding="utf-8")
    assert main(["eval", "transcripts", "--reference", str(ref), "--hypothesis", str(hyp)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["by_language"]["zh"]["primary"] == "cer" and out["by_language"]["zh"]["cer"] == pytest.approx(1 / 6)
    assert out["by_language"]["und"]["primary"] == "wer" and out["by_language"]["und"]["wer"] == 0.0
    assert out["missing"] == []
    hyp.write_text("not json\n", encoding="utf-8")
    assert main(["eval", "transcripts", "--reference", str(ref), "--hypothesis", str(hyp)]) == 2
    assert "hyp.jsonl:1" in capsys.readouterr().err


@pytest.mark.parametrize("spoken,written", [
    ("twenty seven seconds", "27 seconds"),
    ("twenty-seven seconds", "27 seconds"),
    ("three thousand hours", "3000 hours"),
    ("three thousand hours", "3,000 hours"),
    ("3 thousand hours", "3000 hours"),
    ("two hundred and five", "205"),
    ("forty", "40"),
])
def test_a_number_said_in_words_equals_its_digits(spoken: str, written: str) -> None:
    assert wer(spoken, written) == 0.0 and wer(written, spoken) == 0.0


def test_counting_keeps_one_token_per_number() -> None:
    # Joining "one two three" into "123" would score a correct "1, 2, 3" 300 % wrong.
    assert wer("one two three", "1-2-3") == 0.0 and wer("one two three", "1, 2, 3") == 0.0
    assert wer("one two three", "123") == 1.0
    assert wer("twenty twenty", "20 20") == 0.0  # two tens are two numbers

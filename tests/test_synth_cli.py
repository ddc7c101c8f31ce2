"""``kimia-curate synth``: espeak-ng speech kept only when Whisper hears its text back."""

from __future__ import annotations

import json
from pathlib import Path



from pipeline.cli import main
from pipeline.inspect_output import inspect_output
from stages.write import OutLayout

ROOT = Path(__file__).resolve().parent.parent


def test_synth_writes_verified_shards_and_resumes(tmp_path: Path, capsys) -> None:
    texts = tmp_path / "texts.jsonl"
    texts.write_text("\n".join([
        json.dumps({"id": "a", "text": "Please send me the report before the meeting on Friday."}),
        # Chinese characters read by an English voice: espeak says "chinese letter", never the text.
        json.dumps({"id": "b", "text": "\u5929\u5730\u7384\u9ec4\u5b87\u5b99\u6d2a\u8352"}),
        json.dumps({"id": "c", "text": "\u266a"}),  # no words: counted, not spoken
        "not json",
        json.dumps({"id": "d", "text": "Please send me the report before the meeting on Friday.", "voice": "en+f3"}),
    ]) + "\n")
    out = tmp_path / "synth"
    args = ["synth", "--config", str(ROOT / "configs" / "local.yaml"), "--texts", str(texts),
            "--output", str(out), "--voices", "en-us,en+f3", "-q"]
    assert main(args) == 0
    assert "5 lines, 3 utterances spoken" in capsys.readouterr().out
    assert inspect_output(out)["ok"]
    layout = OutLayout(out)
    rows = [r for shard in layout.committed_shards() for r in layout.read_index(shard).to_pylist()]
    # Whether both English lines pass the 0.3 WER gate depends on how this CPU's Whisper hears
    # espeak-ng; what holds on any CPU: only the English lines can be kept, at least one is,
    # what is kept round-tripped, and every line is counted exactly once.
    kept = sorted(json.loads(r["source_meta"])["id"] for r in rows)
    assert kept and set(kept) <= {"a", "d"} and len(kept) == len(set(kept))
    assert all(r["rt_pass"] and r["rt_wer"] <= 0.3 for r in rows)
    summary = layout.read_manifest()["summary"]["synth"]
    assert summary["kept"] == len(kept) and summary["lines"] == 5 and summary["attempted"] == 3
    dropped = summary["dropped"]
    assert dropped["roundtrip_no_words"] == 1 and dropped["bad_json"] == 1  # the note and "not json"
    assert dropped.get("roundtrip_wer>0.3", 0) >= 1  # "b": espeak says "chinese letter", never the text
    assert sum(dropped.values()) + len(kept) == 5
    assert main(args) == 0  # resume: nothing new, nothing twice
    assert inspect_output(out)["samples"] == len(kept)

"""Bad input to ``deepshrink transformer``: each case ends in one clear line (exit 2) and leaves nothing in --out."""

import json

import pytest

pytest.importorskip("transformers")

import deepshrink.transformers as dt  # noqa: E402
from deepshrink.cli import main  # noqa: E402
from deepshrink.core.errors import InputError  # noqa: E402

pytestmark = pytest.mark.unit
WORDS = [f"w{i}" for i in range(40)]


def write_tokenizer(path, words):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(path))
    return path


@pytest.fixture
def setup(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(dt.bert_config(vocab_size=64, hidden_size=32, layers=1, heads=2, intermediate_size=64, max_positions=32).to_dict())
    )
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(" ".join(WORDS[i : i + 5]) for i in range(10)))
    return {"config": config, "tokenizer": write_tokenizer(tmp_path / "tokenizer.json", WORDS), "texts": texts, "out": tmp_path / "run"}


def run_cli(capsys, source, out, *extra) -> str:
    code = main(
        ["transformer", str(source), "--quantize", "dynamic-int8", "--no-fallback", "--out", str(out), "--repeats", "1", *map(str, extra)]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert not out.exists()  # nothing partial
    assert len(err.splitlines()) == 1
    return err


def test_the_good_case_writes_everything(setup, capsys) -> None:
    code = main(
        [
            "transformer",
            str(setup["config"]),
            "--quantize",
            "dynamic-int8",
            "--no-fallback",
            "--texts",
            str(setup["texts"]),
            "--tokenizer",
            str(setup["tokenizer"]),
            "--out",
            str(setup["out"]),
            "--repeats",
            "1",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in setup["out"].iterdir()) == ["compressed.onnx", "original.onnx", "report.json"]


def test_a_directory_without_weights(setup, tmp_path, capsys) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(setup["config"].read_text())
    assert "no weights" in run_cli(capsys, folder, setup["out"])


def test_an_unsupported_architecture(setup, tmp_path, capsys) -> None:
    config = tmp_path / "gpt2.json"
    config.write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32, "vocab_size": 64, "n_positions": 32}))
    assert "model type 'gpt2' is not supported" in run_cli(capsys, config, setup["out"])


def test_a_tokenizer_of_another_model(setup, tmp_path, capsys) -> None:
    big = write_tokenizer(tmp_path / "big.json", [f"v{i}" for i in range(100)])
    err = run_cli(capsys, setup["config"], setup["out"], "--texts", setup["texts"], "--tokenizer", big)
    assert "tokenizer has 104 tokens but the model's vocabulary has 64" in err


def test_an_empty_text_file(setup, tmp_path, capsys) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert "no texts" in run_cli(capsys, setup["config"], setup["out"], "--texts", empty, "--tokenizer", setup["tokenizer"])


def test_a_text_longer_than_the_positions(setup, tmp_path, capsys) -> None:
    long = tmp_path / "long.txt"
    long.write_text("w1 w2\n" + " ".join(WORDS) + "\n")  # 40 words + 2 specials > 32 positions
    err = run_cli(capsys, setup["config"], setup["out"], "--texts", long, "--tokenizer", setup["tokenizer"])
    assert "text 2 is 42 tokens, longer than the model's 32 positions" in err


def test_load_encoder_refuses_them_too(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError, match="no weights"):
        dt.load_encoder(tmp_path)
    with pytest.raises(InputError, match="not supported"):
        dt.load_encoder({"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32, "vocab_size": 64})

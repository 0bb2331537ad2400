"""The caption_tuned text tower in numpy (issue 21, item 5: a new text's cold `compare`).

Two real saved encoders (the packaged sentence model as text tower, a tiny untrained image
tower): text_projection identity (embed_dim 384) and linear (a fixed random projection to 32).
The numpy tower must give the torch encoder's embeddings, warnings and sha256, import none of
torch / transformers / open_clip, and be what `Diagnoser.load` uses for a text it has not seen.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from llm2loss_pipeline.core import query
from llm2loss_pipeline.core.attributes import CELEBA_ATTRIBUTES
from llm2loss_pipeline.core.encoder import EncoderConfig, build_encoder, load_encoder, save_encoder
from llm2loss_pipeline.core.encoder.numpy_text import (
    NumpyTextTower,
    TowerUnavailable,
    clean_text,
    load_numpy_text_tower,
)
from llm2loss_pipeline.core.heads import load_ensemble, save_ensemble
from llm2loss_pipeline.core.layout import Layout
from llm2loss_pipeline.core.prompts import attribute_prompt_pairs
from llm2loss_pipeline.core.storage import StorageError
from llm2loss_pipeline.diagnoser import Diagnoser
from tests import test_diagnoser as base
from tests.test_diagnoser import DIM, GLASSES, HAT, SHA

os.environ.setdefault("HF_HUB_OFFLINE", "1")
home = base.home  # heads trained on 32-dimensional embeddings

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"image_size": 32, "vision_width": 8, "vision_layers": 1, "vision_head_width": 8}
LONG = "a smiling person wearing glasses and a hat " * 20  # about 180 tokens: truncated


def varied_texts() -> list[str]:
    """About 200 texts: attribute prompts, over-long ones, punctuation, unicode, single words."""
    prompts = [
        text
        for name in CELEBA_ATTRIBUTES
        for pair in attribute_prompt_pairs(name)[:2]
        for text in pair
    ]
    odd = [
        LONG,
        LONG + " and more words after the cut",
        "word " * 74 + "end",  # exactly the context with [CLS] and [SEP]: kept whole
        "word " * 76,
        "Hello,   WORLD!!  ",
        "don't-stop—now… (really?) [yes]; {no}: 50% @home #1 $2 & co.",
        "café naïve résumé Ångström façade",
        "日本語のテキストと中文字符",
        "emoji 😀 face 👓 glasses",
        "&amp;lt;b&amp;gt; html &quot;quoted&quot;",
        "tab\there\nnewline\r\nand\u00a0nbsp",
        "ＦＵＬＬＷＩＤＴＨ letters",
        "Ｍixed ÇASE ß straße",
        "[PAD] odd [PAD] tokens [SEP] [CLS]",
        "x",
        "?",
        "glasses",
        "Eyeglasses",
        "a",
        "UPPER CASE PERSON WITH A HAT",
    ]
    words = ["person", "bald", "beard", "smile", "blond", "hat", "glasses", "makeup", "young"]
    singles = [w.upper() if i % 2 else w for i, w in enumerate(words)]
    texts = list(dict.fromkeys(prompts + odd + singles))
    assert 150 <= len(texts) <= 260
    return texts


def save(config: EncoderConfig, folder: Path) -> Path:
    save_encoder(build_encoder(config), folder)
    return folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("encoders")
    return {
        "identity": save(EncoderConfig(**SMALL), root / "identity"),
        "linear": save(
            EncoderConfig(**SMALL, embed_dim=DIM, text_projection="linear", seed=3),
            root / "linear",
        ),
    }


def encode_recording(encoder, texts: list[str]) -> tuple[np.ndarray, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        embeddings = encoder.encode_texts(texts)
    return embeddings, [str(w.message) for w in caught]


@pytest.mark.parametrize("projection", ["identity", "linear"])
def test_numpy_tower_gives_the_torch_encoders_embeddings(saved, projection):
    texts = varied_texts()
    tower = load_numpy_text_tower(saved[projection])
    encoder = load_encoder(saved[projection])
    assert tower.sha256 == encoder.sha256 and tower.embed_dim == encoder.embed_dim
    assert tower.context_length == encoder.tokenizer.context_length == 77
    ours, our_notes = encode_recording(tower, texts)
    theirs, their_notes = encode_recording(encoder, texts)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape == (len(texts), tower.embed_dim)
    assert np.abs(ours - theirs).max() <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    assert our_notes == their_notes and len(our_notes) == 3  # LONG, LONG + more, "word " * 76
    assert all("it was truncated to the tokenizer context of 77" in n for n in our_notes)
    # the same tokens as open_clip's HFTokenizer, padding and all
    reference = encoder.tokenizer(texts).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same three notes as above
        rows = tower.token_rows(texts)
    for text, row, padded in zip(texts, rows, reference, strict=True):
        assert row == padded[: max(int((padded != 0).sum()), 1)].tolist(), text


def test_a_text_is_embedded_alike_alone_and_padded_in_a_batch(saved):
    tower = load_numpy_text_tower(saved["linear"])
    texts = ["a", GLASSES, LONG, "a person with a big beard and a hat, smiling"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = tower.encode_texts(texts)
        alone = np.concatenate([tower.encode_texts([t]) for t in texts])
    assert np.abs(batch - alone).max() <= 1e-6
    assert np.abs(batch[0] - batch[1]).max() > 0.01  # the mask does not make every text alike
    assert clean_text("  a\u00a0 &amp;amp;  b\n") == "a & b"


def test_the_numpy_tower_imports_neither_torch_nor_transformers(saved, tmp_path):
    out = tmp_path / "emb.npy"
    script = (
        "import json, sys\n"
        "import numpy as np\n"
        "from llm2loss_pipeline.core.encoder.numpy_text import load_numpy_text_tower\n"
        f"tower = load_numpy_text_tower({str(saved['linear'])!r})\n"
        f"np.save({str(out)!r}, tower.encode_texts([{GLASSES!r}, {HAT!r}]))\n"
        "heavy = ('torch', 'transformers', 'open_clip', 'torchvision', 'scipy')\n"
        "print(json.dumps(sorted(m for m in heavy if m in sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
    expected = load_encoder(saved["linear"]).encode_texts([GLASSES, HAT])
    assert np.abs(np.load(out) - expected).max() <= 1e-5


def damaged_copy(folder: Path, tmp_path: Path, name: str) -> Path:
    copy = tmp_path / "encoder"
    shutil.copytree(folder, copy)
    data = bytearray((copy / name).read_bytes())
    data[-2] ^= 0x01  # in the weights: the last tensor's bytes; in tokenizer.json: its text
    (copy / name).write_bytes(bytes(data))
    return copy


@pytest.mark.parametrize("name", ["open_clip_model.safetensors", "tokenizer.json", "config.json"])
def test_a_modified_file_is_refused_as_load_encoder_refuses_it(saved, tmp_path, name):
    copy = damaged_copy(saved["linear"], tmp_path, name)
    with pytest.raises(StorageError, match=rf"{name}: sha256 \w+ does not match encoder.json"):
        load_numpy_text_tower(copy)
    with pytest.raises(StorageError, match=r"does not match encoder\.json"):
        query.default_encoder_loader(copy, "cpu")  # no fallback to the full encoder either


def test_other_encoders_load_the_full_encoder(saved, tmp_path, monkeypatch):
    copy = tmp_path / "encoder"
    shutil.copytree(saved["linear"], copy)
    sidecar = json.loads((copy / "encoder.json").read_text())
    (copy / "encoder.json").write_text(json.dumps({**sidecar, "mode": "pretrained"}))
    with pytest.raises(TowerUnavailable, match="'pretrained' is not caption_tuned"):
        load_numpy_text_tower(copy)
    from llm2loss_pipeline.core.encoder import checkpoint

    loaded = []
    monkeypatch.setattr(checkpoint, "load_encoder", lambda d, device: loaded.append(d) or "full")
    assert query.default_encoder_loader(copy, "cpu") == "full" and loaded == [copy]

    config = json.loads((saved["linear"] / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"]["hf_pooler_type"] = "cls_pooler"
    (copy / "encoder.json").write_text(json.dumps(sidecar))
    (copy / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(TowerUnavailable, match="hf_pooler_type is 'cls_pooler'"):
        load_numpy_text_tower(copy)

    assert isinstance(query.default_encoder_loader(saved["linear"], "cpu"), NumpyTextTower)
    monkeypatch.setenv(query.TEXT_TOWER_ENV, "torch")
    assert query.default_encoder_loader(saved["linear"], "cpu") == "full"


@pytest.fixture()
def real_home(home, saved, tmp_path) -> Path:
    """test_diagnoser's home with a real saved encoder (linear, 32 wide) in place of the fake
    one, and its heads' index naming that encoder."""
    copy = tmp_path / "home"
    shutil.copytree(home, copy)
    layout = Layout.at(copy)
    shutil.rmtree(layout.encoder_dir)
    shutil.copytree(saved["linear"], layout.encoder_dir)
    sha = json.loads((layout.encoder_dir / "encoder.json").read_text())["sha256"]
    ensemble, gap, _ = load_ensemble(
        layout.heads_dir, expected_dim=DIM, expected_encoder_sha256=SHA
    )
    save_ensemble(ensemble, gap, layout.heads_dir, embedding_dim=DIM, encoder_sha256=sha)
    return copy


def test_diagnoser_embeds_a_new_text_with_the_numpy_tower(real_home, saved):
    new = "a person with a very unusual purple scarf"
    diagnoser = Diagnoser.load(real_home)
    answer = diagnoser.compare(new, GLASSES)
    assert isinstance(diagnoser.encode_texts.encoder, NumpyTextTower)
    reference = Diagnoser.load(real_home, encoder_loader=lambda d, device: load_encoder(d))
    np.testing.assert_allclose(answer.diffs, reference.compare(new, GLASSES).diffs, atol=1e-4)
    index = diagnoser.encode_texts.index
    assert set(index.lookup([new, GLASSES])) == {new, GLASSES}

    # an over-long text warns, every time: it is not remembered in the index
    for _ in range(2):
        with pytest.warns(UserWarning, match="truncated to the tokenizer context of 77"):
            Diagnoser.load(real_home).compare(LONG, HAT)
    assert LONG not in Diagnoser.load(real_home).encode_texts.index.lookup([LONG])

    # a fresh process answers a new text without open_clip or transformers
    script = (
        "import json, sys\n"
        "from llm2loss_pipeline.cli import main\n"
        "code = main(['compare', 'a person in a green raincoat', 'a person wearing glasses',"
        f" '--home', {str(real_home)!r}, '--json'])\n"
        "heavy = ('open_clip', 'transformers', 'torchvision')\n"
        "print(json.dumps({'code': code, 'heavy': sorted(m for m in heavy if m in sys.modules)}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().rsplit("\n", 1)[1]) == {"code": 0, "heavy": []}


def test_an_encoder_swapped_after_its_sidecar_was_read_is_refused(real_home, saved):
    diagnoser = Diagnoser.load(real_home)  # reads encoder.json's sha256 now, the tower later
    encoder_dir = Layout.at(real_home).encoder_dir
    shutil.rmtree(encoder_dir)
    shutil.copytree(saved["identity"], encoder_dir)
    with pytest.raises(StorageError, match=r"changed since its encoder\.json"):
        diagnoser.compare("a text never asked before", GLASSES)


def test_erf_is_within_half_a_float32_ulp_of_maths():
    import math

    from llm2loss_pipeline.core.encoder.numpy_text import _gelu, erf

    x = np.concatenate([np.linspace(-9, 9, 400_001), [0.0, -0.0, 5.9999, 6.0, 6.0001, 1e-30, 40]])
    x = x.astype(np.float32)
    exact = np.array([math.erf(v) for v in x.astype(np.float64)])
    assert np.abs(erf(x) - exact).max() <= 6e-8
    assert erf(x).dtype == np.float32 and erf(np.float32(-40.0)) == -1.0
    gelu = x.astype(np.float64) * 0.5 * (1.0 + np.array([math.erf(v / math.sqrt(2)) for v in x]))
    assert np.abs(_gelu(x) - gelu).max() <= 1e-6 * max(1.0, float(np.abs(x).max()))

"""Model sources (custom config JSON, checkpoint URL, offline tag) and the CLI's errors."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

import open_clip
import pytest
import torch

from reco.cli import main
from reco.config import ConfigError, ModelConfig
from reco.models import MODEL_CONFIG_DIR, ModelLoadError, architecture, encode_text, load_clip


def test_custom_model_config_json(tmp_path, monkeypatch):
    arch = json.loads((MODEL_CONFIG_DIR / "reco-tiny.json").read_text())
    arch["embed_dim"] = 32
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(arch))
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    clip = load_clip(ModelConfig(name="my-arch", config=str(path)))
    assert clip.embed_dim == 32
    with torch.no_grad():
        out = clip.model.encode_text(clip.tokenizer(["a photo of a ronlo"]))
    assert out.shape == (1, 32)
    assert list(temp.iterdir()) == []  # the config's registration leaves no file behind
    # Registered once, it stays: a second architecture registered later does not drop it.
    arch["embed_dim"] = 16
    other = tmp_path / "other.json"
    other.write_text(json.dumps(arch))
    assert load_clip(ModelConfig(name="my-other-arch", config=str(other))).embed_dim == 16
    assert open_clip.get_model_config("my-arch")["embed_dim"] == 32


CAPTIONS = ["a car", "a photo of a red sports car parked by the sea at dusk",
            " ".join(["a very long caption"] * 30)]  # past the context length: cut by the tokenizer


@pytest.mark.parametrize("name, text_cfg, trimmed", [
    ("reco-tiny", {}, True),  # context 16
    ("ViT-S-32", {}, True),  # context 77, as the paper's models
    # Bidirectional attention, last token pooled (SigLIP's kind): padding changes every embedding.
    ("no-causal-mask", {"no_causal_mask": True, "pool_type": "last"}, False),
])
def test_text_encoded_without_padding_equals_open_clip(tmp_path, name, text_cfg, trimmed):
    cfg = ModelConfig(name=name)
    if text_cfg:
        arch = json.loads((MODEL_CONFIG_DIR / "reco-tiny.json").read_text())
        arch["text_cfg"].update(text_cfg)
        (tmp_path / "arch.json").write_text(json.dumps(arch))
        cfg = ModelConfig(name=name, config=str(tmp_path / "arch.json"))
    clip = load_clip(cfg)
    widths, longest = [], []
    handle = clip.model.transformer.register_forward_pre_hook(lambda _, args: widths.append(args[0].shape[1]))
    with torch.inference_mode():
        for captions in (CAPTIONS[:1], CAPTIONS[:2], CAPTIONS):
            tokens = clip.tokenizer(captions)
            longest.append(int((tokens != 0).sum(dim=1).max()))  # start, words, end; 0 pads
            ours = encode_text(clip.model, tokens)
            theirs = clip.model.encode_text(tokens, normalize=True)
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    handle.remove()
    context = tokens.shape[1]
    assert longest[0] < longest[1] < longest[2] == context
    # The tower ran on the longest caption's tokens only where that cannot change the result.
    assert widths[::2] == (longest if trimmed else [context] * 3)


def test_bad_model_config_json(tmp_path):
    with pytest.raises(ConfigError, match="model.config: .* does not exist"):
        load_clip(ModelConfig(name="my-arch", config=str(tmp_path / "nope.json")))
    (tmp_path / "bad.json").write_text('{"embed_dim": 8}')
    with pytest.raises(ConfigError, match="model.config: .*lacks"):
        load_clip(ModelConfig(name="my-arch", config=str(tmp_path / "bad.json")))


DRIVER_CHECK = """
import sys
import pipeline.embed
from reco.config import ModelConfig
from reco.models import architecture, embed_dim, register_model_configs, validate_model_config
cfg = ModelConfig(pretrained=sys.argv[1])
validate_model_config(cfg)
print(embed_dim(cfg), "open_clip" in sys.modules)
open_clip = register_model_configs()
names = open_clip.list_models()
print(len(names), [n for n in names if architecture(ModelConfig(name=n)) != open_clip.get_model_config(n)])
"""


def test_driver_checks_the_model_as_open_clip_would_without_importing_it(tiny_checkpoint):
    """open_clip's import is seconds of every `reco embed` (docs/performance.md), and only the
    replicas build the model: the driver checks the config and the weights, and reads d, from
    the architectures' JSON files. In a fresh process (no configs registered by other tests),
    open_clip must then agree on every architecture it knows."""
    out = subprocess.run([sys.executable, "-c", DRIVER_CHECK, tiny_checkpoint], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert out[0] == f"{open_clip.get_model_config('reco-tiny')['embed_dim']} False"
    count, mismatched = out[1].split(" ", 1)
    assert int(count) > 100 and mismatched == "[]"


def test_unknown_architecture_names():
    for name in ("ViT-B-33", "../model_configs/ViT-B-32", "model_configs/ViT-B-32"):
        with pytest.raises(ConfigError, match="model.name: unknown architecture"):
            architecture(ModelConfig(name=name))


def test_checkpoint_from_url_equals_local_file(tmp_path, tiny_checkpoint, s3_bucket):
    import fsspec

    fsspec.filesystem("s3").put(tiny_checkpoint, f"{s3_bucket}/weights/reco-tiny.pt")
    remote = load_clip(ModelConfig(pretrained=f"{s3_bucket}/weights/reco-tiny.pt"))
    local = load_clip(ModelConfig(pretrained=tiny_checkpoint))
    for (name, a), b in zip(remote.model.state_dict().items(), local.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_missing_pretrained_weights_fail_fast_offline():
    with pytest.raises(ModelLoadError, match=r"model.pretrained=/path/or/s3://"):
        load_clip(ModelConfig(name="RN50", pretrained="openai"))


def test_cli_reports_config_errors(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"workdir: {tmp_path / 'w'}\nembed: {{input: {tmp_path / 'missing'}}}\n")
    assert main(["embed", str(config)]) == 2
    assert "embed.input:" in capsys.readouterr().err
    assert main(["embed", str(config), "embed.batchsize=3"]) == 2
    assert "did you mean embed.batch_size?" in capsys.readouterr().err
    assert main(["embed", str(config), "nokey"]) == 2
    assert "expected dotted.key=value" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_cli_help_lists_stages(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("embed", "run", "demo"):
        assert command in out

import pytest

from wsss.config import Config, ConfigError, load_config, save_config


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(None, ["train.max_iters=12", "cam.scales=[1.0, 0.5]", "model.gcr=false", "optim.lr=1"])
    assert cfg.train.max_iters == 12
    assert cfg.cam.scales == [1.0, 0.5]
    assert cfg.model.gcr is False
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # ints are accepted for floats


def test_yaml_file_and_roundtrip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  root: /x\ntrain:\n  batch_size: 2\n")
    cfg = load_config(path, ["seed=3"])
    assert (cfg.data.root, cfg.train.batch_size, cfg.seed) == ("/x", 2, 3)
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == cfg


@pytest.mark.parametrize("override, message", [
    ("train.max_itres=5", "unknown key 'train.max_itres'"),
    ("nosuch=1", "unknown key 'nosuch'"),
    ("train.max_iters=abc", "train.max_iters: expected an int"),
    ("train.max_iters=1.5", "train.max_iters: expected an int"),
    ("model.gcr=3", "model.gcr: expected true/false"),
    ("cam.scales=1.0", "cam.scales: expected a list"),
    ("amp=fp8", "amp: 'fp8' is not one of"),
    ("data.dataset=cityscapes", "data.dataset: 'cityscapes' is not one of"),
    ("train=3", "train: expected a mapping"),
    ("novalue", "must look like key.sub=value"),
])
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, [override])


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.max_itres=5"])
    assert "max_iters" in str(e.value) and "batch_size" in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", ["demo.yaml", "voc.yaml", "coco.yaml"])
def test_shipped_configs_validate(name):
    import pathlib

    path = pathlib.Path(__file__).parent.parent / "configs" / name
    assert isinstance(load_config(path), Config)


def test_yaml11_boolean_words_on_the_command_line():
    from wsss.config import load_config

    cfg = load_config(None, ["amp=off", "model.gcr=off", "eval.crf=yes"])
    assert cfg.amp == "off" and cfg.model.gcr is False and cfg.eval.crf is True
    with pytest.raises(ConfigError, match="quote it"):
        from wsss.config import config_from_dict

        config_from_dict({"amp": False})


@pytest.mark.parametrize("bad", ["cam.scales=[1.0, abc]", "cam.scales=[1.0, .inf]", "optim.lr=nan",
                                 "eval.bkg_thre=inf"])
def test_non_numeric_and_non_finite_floats_are_rejected(bad):
    key = bad.split("=")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [bad])

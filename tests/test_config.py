from pathlib import Path

import pytest

from flows.config import ConfigError, PipelineConfig, dump_config, load_config


def test_yaml_and_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data:\n  root: /data/kface\ndetector:\n  confidence: 0.8\n")
    cfg = load_config(cfg_file, {"detector.confidence": 0.7, "sharding.shard_size": 50})
    assert cfg.data.root == Path("/data/kface")
    assert cfg.detector.confidence == 0.7
    assert cfg.sharding.shard_size == 50
    # round trip through YAML gives the same config
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(cfg))
    assert load_config(again) == cfg


def test_set_null_unsets_a_setting(tmp_path):
    """``--set data.metadata=null`` clears what the config file set (it was ignored)."""
    from cli.options import overrides

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data:\n  root: /data/kface\n  metadata: /data/meta.csv\n")
    assert load_config(cfg_file).data.metadata == Path("/data/meta.csv")
    sets = overrides({"data.root": None}, ["data.metadata=null"])
    assert sets == {"data.metadata": None}  # (a flag not given is no override)
    cfg = load_config(cfg_file, sets)
    assert cfg.data.metadata is None and cfg.data.root == Path("/data/kface")


def test_unknown_key_is_named(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("detector:\n  confidance: 0.8\n")
    with pytest.raises(ConfigError, match=r"detector\.confidance: unknown key"):
        load_config(cfg_file)


def test_bad_value_is_named():
    with pytest.raises(ConfigError, match=r"detector\.confidence: .*less than 1"):
        load_config(None, {"detector.confidence": 1.5})
    with pytest.raises(ConfigError, match=r"data\.layout"):
        load_config(None, {"data.layout": "folders"})


def test_calibration_folder_must_be_a_folder_of_the_run(tmp_path):
    """A check across sections (train reads data.folders) is one line naming the key."""
    with pytest.raises(ConfigError, match=r"train\.calibration_folder: 'aaf' needs several "
                       r"labelled folders \(data\.folders\)") as caught:
        load_config(None, {"train.calibration_folder": "aaf"})
    assert "got" not in str(caught.value)  # (not the whole configuration echoed)
    folders = [{"name": n, "root": str(tmp_path), "labels": "labels.csv"}
               for n in ("aaf", "utk")]
    with pytest.raises(ConfigError, match=r"'AAF' is not one of data\.folders' names "
                       r"\(aaf, utk\)"):
        load_config(None, {"data.layout": "labelled", "data.folders": folders,
                           "train.calibration_folder": "AAF"})
    cfg = load_config(None, {"data.layout": "labelled", "data.folders": folders,
                             "train.calibration_folder": "utk"})
    assert cfg.train.calibration_folder == "utk"
    assert "calibration_folder" not in PipelineConfig().train.key_settings()  # (off: keys kept)


def test_defaults_are_the_originals_lists():
    sel = PipelineConfig().selection
    assert sel.lights == ["L1", "L2", "L3", "L4", "L8", "L9", "L12", "L13", "L22"]
    assert sel.cameras == ["C4", "C5", "C6", "C7", "C8", "C9", "C10", "C19", "C20"]
    assert sel.accessories == ["S001", "S002", "S003"] and sel.expressions == ["E01", "E02"]


def test_flow_parameter_schema_is_the_config():
    from flows.pipeline import kface_pipeline

    schema = kface_pipeline.parameters.model_dump()
    props = schema["properties"]["config"]
    ref = props.get("$ref") or props["allOf"][0]["$ref"]
    definition = schema["definitions"][ref.split("/")[-1]]
    assert {"data", "selection", "detector", "sharding", "out"} <= set(definition["properties"])


def test_shard_workers_stay_lean():
    """Every spawned worker imports the flow module to run its shard tasks: it must not
    pull in TensorFlow, Keras, matplotlib or scikit-learn (~100 MB to ~1 GB per process)."""
    import subprocess
    import sys

    code = ("import sys, flows.pipeline; print(sorted(m for m in ('tensorflow', 'keras', "
            "'matplotlib', 'sklearn', 'distributed') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


@pytest.mark.parametrize("name", sorted(p.name for p in (
    Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")))
def test_every_config_finds_its_weights_in_the_package(name):
    """Each shipped config loads and its weight files are there on a fresh clone: none
    names ../shared (the quality recipe's MobileFaceNet ships with kface: builtin)."""
    from models.classifier import check_weights, model_key_settings

    path = Path(__file__).resolve().parents[1] / "configs" / name
    assert "../shared" not in "\n".join(line for line in path.read_text().splitlines()
                                        if not line.lstrip().startswith("#"))
    cfg = load_config(path)
    check_weights(cfg.model)
    settings = model_key_settings(cfg.model)
    if cfg.model.backbone == "mobilefacenet":  # keyed on the files' content, not a path
        assert len(settings["weights"]) == 2 and all(len(d) == 64 for d in settings["weights"])


def test_a_missing_mobilefacenet_folder_is_named_whole(tmp_path):
    from models.classifier import ModelConfig, check_weights
    from models.mobilefacenet import MobileFaceNetError

    with pytest.raises(MobileFaceNetError, match="mobilefacenet/model-y1-test2-symbol.json"
                                                 " not found: set model.weights to builtin"):
        check_weights(ModelConfig(backbone="mobilefacenet",
                                  weights=str(tmp_path / "mobilefacenet")))

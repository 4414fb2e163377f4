import numpy as np
import pytest

from models.classifier import ModelConfig, WeightsError, build_classifier


def test_resnet50_is_the_original_layer_for_layer():
    model = build_classifier(ModelConfig(), 224)
    assert model.count_params() == 23_859_462  # the blog's model.summary() total
    names = [type(layer).__name__ for layer in model.layers]
    assert names[-8:-2] == ["GlobalAveragePooling2D", "Dropout", "BatchNormalization",
                            "Dense", "Dropout", "BatchNormalization"]
    assert model.get_layer("resnet50").count_params() == 23_587_712
    assert model.output["gender"].shape[-1] == 2 and model.output["age_band"].shape[-1] == 4


def test_local_imagenet_weights_are_loaded(shared_data):
    path = shared_data / "weights" / "mobilenet_2_5_224_tf_no_top.h5"
    cfg = ModelConfig(backbone="mobilenet", alpha=0.25, weights=str(path))
    a = build_classifier(cfg, 128).get_layer("mobilenet_0.25_128").get_weights()[0]
    b = build_classifier(cfg, 128).get_layer("mobilenet_0.25_128").get_weights()[0]
    c = build_classifier(ModelConfig(backbone="mobilenet", alpha=0.25), 128)
    c = c.get_layer("mobilenet_0.25_128").get_weights()[0]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_weights_errors_are_clear(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        build_classifier(ModelConfig(backbone="mobilenet", weights=str(tmp_path / "x.h5")), 96)
    with pytest.raises(WeightsError, match="internet"):
        build_classifier(ModelConfig(backbone="mobilenet", weights="imagenet"), 96)
    with pytest.raises(WeightsError, match="small_cnn"):
        build_classifier(ModelConfig(backbone="small_cnn", weights="imagenet"), 96)

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


def test_mobilenet_v2_takes_the_shared_imagenet_weights(shared_data):
    path = (shared_data / "weights"
            / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5")
    cfg = ModelConfig(backbone="mobilenet_v2", alpha=0.35, weights=str(path))
    model = build_classifier(cfg, 160, exact_age=True)
    backbone = model.get_layer("mobilenetv2_0.35_160")
    scratch = build_classifier(cfg.model_copy(update={"weights": "none"}), 160)
    assert not np.array_equal(backbone.get_weights()[0],
                              scratch.get_layer("mobilenetv2_0.35_160").get_weights()[0])
    assert set(model.output) == {"gender", "age_band", "age"}
    with pytest.raises(WeightsError, match="does not fit backbone mobilenet_v2"):
        build_classifier(cfg.model_copy(update={"alpha": 0.5}), 160)


def test_weights_errors_are_clear(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        build_classifier(ModelConfig(backbone="mobilenet", weights=str(tmp_path / "x.h5")), 96)
    with pytest.raises(WeightsError, match="internet"):
        build_classifier(ModelConfig(backbone="mobilenet", weights="imagenet"), 96)
    with pytest.raises(WeightsError, match="small_cnn"):
        build_classifier(ModelConfig(backbone="small_cnn", weights="imagenet"), 96)


def test_age_loss_adds_the_mean_age_error_and_reloads():
    import keras

    from models.classifier import age_targets
    from models.losses import AgeLoss
    from tasks.train import TrainConfig

    truth, guess = age_targets([30, 30], 3.0), age_targets([45, 31], 3.0)
    plain = keras.ops.convert_to_numpy(AgeLoss(0.0)(truth, guess))
    ce = keras.ops.convert_to_numpy(keras.ops.mean(
        keras.losses.categorical_crossentropy(truth, guess)))
    assert plain == pytest.approx(ce, rel=1e-5)
    # per face: 15 and 1 years off (1.5 and 0.1 tens of years), averaged over the batch
    with_mean = keras.ops.convert_to_numpy(AgeLoss(2.0)(truth, guess))
    assert with_mean - plain == pytest.approx(2.0 * (1.5 + 0.1) / 2, abs=0.02)
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(
        AgeLoss(2.0)))
    assert isinstance(again, AgeLoss) and again.mean_weight == 2.0
    # off, the train key is what it was before the setting existed
    assert "age_mean_weight" not in TrainConfig().key_settings()
    assert TrainConfig(age_mean_weight=1.0).key_settings()["age_mean_weight"] == 1.0

"""Models nobody on this project wrote, built small, without downloads.

Every BN-bearing keras.applications family and the keras-hub CNN
backbones, from their constructor arguments (`weights=None`; keras-hub
configs shrunk from the ones in their docstrings) at small input sizes, for
the sweep test (`tests/test_zoo.py`) and the benchmark. Each entry is
`name -> (build(), input size)`; `build` returns an unbuilt-weights model
whose BN statistics are Keras' initial ones (the caller randomizes them).
"""

import functools

import keras


def _applications(name, size, **kwargs):
    cls = getattr(keras.applications, name)
    return cls(weights=None, include_top=False,
               input_shape=(size, size, 3), **kwargs)


# (keras.applications class, smallest input it takes, or a small one).
APPLICATIONS = {
    "ResNet50": 32,
    "ResNet50V2": 32,
    "InceptionV3": 75,
    "InceptionResNetV2": 75,
    "Xception": 71,
    "MobileNet": 32,
    "MobileNetV2": 32,
    "MobileNetV3Small": 32,
    "DenseNet121": 32,
    "NASNetMobile": 32,
    "EfficientNetB0": 32,
    "EfficientNetV2B0": 32,
}


def _hub():
    import keras_hub

    return keras_hub.models


def hgnetv2(size=64):
    """keras-hub HGNetV2Backbone, the config in its own docstring."""
    return _hub().HGNetV2Backbone(
        depths=[1, 2, 4], embedding_size=32, hidden_sizes=[64, 128, 256],
        stem_channels=[3, 16, 32], hidden_act="relu",
        use_learnable_affine_block=False,
        stackwise_stage_filters=[(32, 16, 64, 1, 1, 3),
                                 (64, 32, 128, 2, 1, 3),
                                 (128, 64, 256, 4, 1, 3)],
        apply_downsample=[False, True, True],
        use_lightweight_conv_block=[False, False, False],
        image_shape=(size, size, 3))


def hub_mobilenet(size=64):
    """keras-hub MobileNetBackbone (v3-style blocks, SE, hard-swish)."""
    return _hub().MobileNetBackbone(
        stackwise_expansion=[[40, 56], [64, 144, 144], [72, 72],
                             [144, 288, 288]],
        stackwise_num_blocks=[2, 3, 2, 3],
        stackwise_num_filters=[[16, 16], [24, 24, 24], [24, 24],
                               [48, 48, 48]],
        stackwise_kernel_size=[[3, 3], [5, 5, 5], [5, 5], [5, 5, 5]],
        stackwise_num_strides=[[2, 1], [2, 1, 1], [1, 1], [2, 1, 1]],
        stackwise_se_ratio=[[None, None], [0.25, 0.25, 0.25], [0.3, 0.3],
                            [0.3, 0.25, 0.25]],
        stackwise_activation=[["relu", "relu"], ["hard_swish"] * 3,
                              ["hard_swish"] * 2, ["hard_swish"] * 3],
        stackwise_padding=[[1, 1], [2, 2, 2], [2, 2], [2, 2, 2]],
        output_num_filters=288, input_activation="hard_swish",
        output_activation="hard_swish", input_num_filters=16,
        image_shape=(size, size, 3), depthwise_filters=8,
        squeeze_and_excite=0.5, depthwise_stride=1,
        depthwise_residual=False, last_layer_filter=288)


def hub_resnet(block_type, pre_activation, size=32):
    vd = "vd" in block_type
    stem = ([32, 32, 64], [3, 3, 3]) if vd else ([64], [7])
    return _hub().ResNetBackbone(
        input_conv_filters=stem[0], input_conv_kernel_sizes=stem[1],
        stackwise_num_filters=[64, 32, 32] if vd else [64, 64, 64],
        stackwise_num_blocks=[1, 2, 1],
        stackwise_num_strides=[1, 2, 2], block_type=block_type,
        use_pre_activation=pre_activation, image_shape=(size, size, 3))


def hub_cspnet(size=32):
    return _hub().CSPNetBackbone(
        stem_filters=16, stem_kernel_size=3, stem_strides=1,
        stackwise_depth=[1, 2, 1], stackwise_strides=[1, 2, 2],
        stackwise_num_filters=[16, 32, 64], block_type="dark_block",
        stage_type="dark",
        image_shape=(size, size, 3))


def hub_densenet(size=32):
    return _hub().DenseNetBackbone(stackwise_num_repeats=[2, 2, 2],
                                   growth_rate=8, image_shape=(size, size, 3))


def hub_efficientnet(size=32):
    return _hub().EfficientNetBackbone(
        stackwise_kernel_sizes=[3, 3, 3, 3],
        stackwise_num_repeats=[1, 2, 1, 2],
        stackwise_input_filters=[16, 16, 24, 32],
        stackwise_output_filters=[16, 24, 32, 48],
        stackwise_expansion_ratios=[1, 4, 4, 4],
        stackwise_squeeze_and_excite_ratios=[0.0, 0.0, 0.25, 0.25],
        stackwise_strides=[1, 2, 2, 1],
        stackwise_block_types=["fused", "fused", "unfused", "unfused"],
        stackwise_width_coefficients=[1.0] * 4,
        stackwise_depth_coefficients=[1.0] * 4, num_features=64,
        input_shape=(size, size, 3))


def hub_xception(size=32):
    return _hub().XceptionBackbone(
        stackwise_conv_filters=[[16, 32], [32, 64], [64, 64]],
        stackwise_pooling=[True, True, False], image_shape=(size, size, 3))


def hub_vgg(size=32):
    """No BN at all: the control (fold must leave it as it is)."""
    return _hub().VGGBackbone(stackwise_num_repeats=[1, 2],
                              stackwise_num_filters=[16, 32],
                              image_shape=(size, size, 3))


HUB = {
    "hub_ResNet_v1": (functools.partial(hub_resnet, "basic_block", False),
                      32),
    "hub_ResNet_v2": (functools.partial(hub_resnet, "basic_block", True), 32),
    "hub_ResNet_vd": (functools.partial(hub_resnet, "bottleneck_block_vd",
                                        False), 32),
    "hub_CSPNet": (hub_cspnet, 32),
    "hub_HGNetV2": (hgnetv2, 64),
    "hub_MobileNet": (hub_mobilenet, 64),
    "hub_DenseNet": (hub_densenet, 32),
    "hub_EfficientNet": (hub_efficientnet, 32),
    "hub_Xception": (hub_xception, 32),
    "hub_VGG": (hub_vgg, 32),
}

ZOO = {
    **{name: (functools.partial(_applications, name, size), size)
       for name, size in APPLICATIONS.items()},
    **HUB,
}

"""Model registry: ``build_model(model_cfg, num_classes, in_chans, img_size)`` by ``model.name``.

Registered names (see ``conf/model/*.yaml``): ``convnet`` (ConvNet-D), ``resnet18`` / ``resnet50`` /
``resnet101`` (torchvision; knob ``small_stem``), ``resnet18_cifar`` / ``resnet50_cifar`` /
``resnet101_cifar`` (small-image stem), ``mobilenetv2``, ``efficientnet_b0``, ``shufflenetv2`` (x0.5),
``swinv2_tiny`` (timm; knob ``window_size``), ``timm`` (any timm model by name, knob ``arch``: the fallback of
``student.arch``). Importing this package registers them all.
"""

from lpld.models import convnet, swin, timm_models, torchvision_models  # noqa: F401  (populate the registry)
from lpld.models.checkpoint import ModelCheckpointError, extract_state_dict, load_model_checkpoint
from lpld.models.features import classifier_module, forward_with_features, penultimate_features
from lpld.models.pretrained import PretrainedWeightsError, host_reachable
from lpld.models.registry import COMMON_KEYS, MODEL_REGISTRY, ModelEntry, build_model, model_names, register_model

__all__ = [
    "COMMON_KEYS",
    "MODEL_REGISTRY",
    "ModelCheckpointError",
    "ModelEntry",
    "PretrainedWeightsError",
    "build_model",
    "classifier_module",
    "extract_state_dict",
    "forward_with_features",
    "host_reachable",
    "load_model_checkpoint",
    "model_names",
    "penultimate_features",
    "register_model",
]

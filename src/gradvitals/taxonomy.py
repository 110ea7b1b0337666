"""Names of module kinds the probes and rules reason about. No torch.

Activation names are normalised to lower case without underscores, so a module
class (``LeakyReLU``) and a function (``leaky_relu``) map to the same family.
"""

from __future__ import annotations

#: activation name -> family. The family decides the init the layer before it should
#: have (He for the ReLU family and its smooth cousins, Xavier for sigmoid/tanh).
ACTIVATION_FAMILY: dict[str, str] = {
    "relu": "relu", "relu6": "relu", "rrelu": "leaky_relu",
    "leakyrelu": "leaky_relu", "prelu": "leaky_relu",
    "elu": "elu", "selu": "elu", "celu": "elu",
    "gelu": "gelu", "silu": "gelu", "mish": "gelu", "hardswish": "gelu",
    "softplus": "gelu",
    "sigmoid": "sigmoid", "hardsigmoid": "sigmoid", "logsigmoid": "sigmoid",
    "tanh": "tanh", "hardtanh": "tanh", "softsign": "tanh", "tanhshrink": "tanh",
}

#: Families whose units output exact zeros for negative input (can die).
ZEROING_FAMILIES = frozenset({"relu"})
#: Families that saturate at both ends (gradient ~0 at the bounds).
SATURATING_FAMILIES = frozenset({"sigmoid", "tanh"})
#: Families for which He (Kaiming) init keeps the signal's variance; the rest get Xavier.
HE_FAMILIES = frozenset({"relu", "leaky_relu", "elu", "gelu"})

#: Layer kinds whose weights carry the signal (their init matters).
WEIGHT_LAYERS = frozenset({
    "Linear", "Bilinear", "LazyLinear", "Conv1d", "Conv2d", "Conv3d",
    "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
})
NORM_LAYERS = frozenset({
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "LayerNorm", "GroupNorm",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "RMSNorm", "LocalResponseNorm",
})
BATCHNORM_LAYERS = frozenset({"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm"})
RECURRENT_LAYERS = frozenset({"RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell"})
EMBEDDING_LAYERS = frozenset({"Embedding", "EmbeddingBag"})
#: Modules the activation-after search looks through (they don't change the init choice).
TRANSPARENT_LAYERS = NORM_LAYERS | frozenset({"Dropout", "Dropout1d", "Dropout2d", "Dropout3d",
                                              "AlphaDropout", "Identity", "Flatten", "Unflatten",
                                              "MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool1d",
                                              "AvgPool2d", "AvgPool3d", "AdaptiveAvgPool1d",
                                              "AdaptiveAvgPool2d", "AdaptiveMaxPool2d"})


def activation_family(name: str | None) -> str | None:
    """Family of an activation given by module class or function name; None if not one."""
    if not name:
        return None
    key = name.lower().replace("_", "").rstrip("_")
    if key.endswith("_"):
        key = key[:-1]
    return ACTIVATION_FAMILY.get(key)

"""Heads shared by the single-stage networks (SPEC §2)."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class LargeFOV(nn.Module):
    """DeepLab-LargeFOV decoder: two dilated 3x3 convs (dilation 5) and a 1x1 classifier."""

    def __init__(self, in_planes: int, out_planes: int, mid_planes: int = 512, dilation: int = 5):
        super().__init__()
        self.conv6 = nn.Conv2d(in_planes, mid_planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.conv7 = nn.Conv2d(mid_planes, mid_planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.conv8 = nn.Conv2d(mid_planes, out_planes, 1, bias=False)
        for m in (self.conv6, self.conv7):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.xavier_uniform_(self.conv8.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv6(x))
        x = F.relu(self.conv7(x))
        return self.conv8(x)


def conv_classifier(dim: int, num_classes: int) -> nn.Conv2d:
    """1x1 conv, no bias: the CAM classifier applied after global max pooling."""
    conv = nn.Conv2d(dim, num_classes, 1, bias=False)
    nn.init.kaiming_normal_(conv.weight)
    return conv


def global_max_pool_logits(classifier: nn.Conv2d, features: torch.Tensor) -> torch.Tensor:
    """(B,D,h,w) -> (B,C): classifier(globalmaxpool(F))."""
    pooled = F.adaptive_max_pool2d(features, 1)
    return classifier(pooled).flatten(1)


def class_activation(classifier: nn.Conv2d, features: torch.Tensor) -> torch.Tensor:
    """Raw CAM (B,C,h,w) = conv(F, classifier.weight); ReLU is applied by the caller."""
    return F.conv2d(features, classifier.weight)

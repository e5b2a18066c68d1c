"""The convolutional denoisers of the paper (ResNet and UNet) and the adapter that makes them score models.

Both networks predict the noise eps of ``x_t = sqrt(alpha_bar) x_0 + sqrt(beta) eps`` from
``(x_t, t, label)``. Images are (B, C, H, W) float tensors in the [-1, 1] pixel scale; t is in [0, 1].
Neither network normalises image features (normalisation would mix information across the
image); the conditioning embedding is normalised with GroupNorm, which acts on each sample's
embedding vector only (where it has at least 4 channels: see embedding_projection).
"""

import dataclasses
import hashlib
import math
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from patchdb.errors import PatchdbError
from patchdb.schedule import eps_to_score

if TYPE_CHECKING:
    from patchdb.training import TrainingProgress

ARCHITECTURES = ("resnet", "unet")
PADDINGS = ("zeros", "circular")
TIME_SCALE = 1000.0
"""t in [0, 1] is multiplied by this before the sinusoidal embedding, so the training grid's
steps of 1/1000 are one unit apart (the usual DDPM time embedding)."""


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
    """Everything needed to rebuild a network before loading its weights (stored as JSON).

    architecture: "resnet" or "unet". in_channels: image channels C. width: the ResNet's channel
    count (paper 256) or the UNet's first-scale channel count (paper 64; doubled at each of the
    3 scales). num_hidden_layers: the ResNet's residual 3x3 layers between the up- and
    down-projection (paper 6; ignored by the UNet). embedding_dim: size of the time (+ class)
    embedding. num_classes: 0 for an unconditional network, else the number of class labels.
    padding: "zeros" or "circular", the padding of every 3x3 convolution.
    """

    architecture: str = "resnet"
    in_channels: int = 1
    width: int = 256
    num_hidden_layers: int = 6
    embedding_dim: int = 128
    num_classes: int = 0
    padding: str = "zeros"

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise PatchdbError(f"unknown network architecture {self.architecture!r}: use one of {', '.join(ARCHITECTURES)}")
        if self.padding not in PADDINGS:
            raise PatchdbError(f"unknown padding {self.padding!r}: use one of {', '.join(PADDINGS)}")
        for name in ("in_channels", "width", "embedding_dim"):
            if getattr(self, name) < 1:
                raise PatchdbError(f"network {name} must be at least 1, got {getattr(self, name)}")
        if self.num_hidden_layers < 0 or self.num_classes < 0:
            raise PatchdbError("network num_hidden_layers and num_classes must not be negative")
        if self.embedding_dim % 2:
            raise PatchdbError(f"embedding_dim must be even (sine and cosine halves), got {self.embedding_dim}")

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of times t (B,) in [0, 1]: (B, dim), cosines then sines of TIME_SCALE * t
    at dim // 2 geometrically spaced frequencies 10000^(-k / (dim // 2)), k = 0, 1, ...: from 1 down to just above
    1/10000."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = TIME_SCALE * t.float()[:, None] * frequencies[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class ConditioningEmbedding(nn.Module):
    """Sinusoidal time embedding plus, for a conditional network, a learned class embedding: (B, embedding_dim)."""

    def __init__(self, embedding_dim: int, num_classes: int):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.class_embedding = nn.Embedding(num_classes, embedding_dim) if num_classes else None

    def forward(self, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        embedding = sinusoidal_embedding(t, self.embedding_dim)
        if self.class_embedding is not None:
            if labels is None:
                raise PatchdbError("this network is class-conditional: give it labels (e.g. --conditional or --label)")
            embedding = embedding + self.class_embedding(labels)
        return embedding


def embedding_projection(embedding_dim: int, channels: int) -> nn.Sequential:
    """Linear + GroupNorm + ReLU from the conditioning embedding to a per-channel bias (B, channels); below
    MIN_CHANNELS_PER_GROUP channels Linear + ReLU (GroupNorm over one value, the UNet's first block on grey images,
    normalises it to a constant and loses t and the label)."""
    if channels < MIN_CHANNELS_PER_GROUP:
        return nn.Sequential(nn.Linear(embedding_dim, channels), nn.ReLU())
    return nn.Sequential(nn.Linear(embedding_dim, channels), nn.GroupNorm(_num_groups(channels), channels), nn.ReLU())


MIN_CHANNELS_PER_GROUP = 4


def _num_groups(channels: int) -> int:
    """Largest group count <= 32 that divides the channels (at least MIN_CHANNELS_PER_GROUP of them) and leaves at
    least that many channels per group."""
    return next(g for g in range(min(32, channels // MIN_CHANNELS_PER_GROUP), 0, -1) if channels % g == 0)


def conv3x3(in_channels: int, out_channels: int, padding: str) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, padding_mode=padding)


class ResNet(nn.Module):
    """The paper's ResNet: 3x3 up-projection to `width` channels, `num_hidden_layers` residual
    3x3 conv + ReLU layers, 3x3 down-projection. The embedding is added before every layer.

    With L = num_hidden_layers + 2 convolutions of radius 1 an output pixel depends only on the
    (2L+1) x (2L+1) input square around it (17 x 17 for the paper's 6 hidden layers).
    """

    def __init__(self, config: NetworkConfig):
        super().__init__()
        self.config = config
        width, padding = config.width, config.padding
        self.embedding = ConditioningEmbedding(config.embedding_dim, config.num_classes)
        self.up_projection = conv3x3(config.in_channels, width, padding)
        self.hidden_layers = nn.ModuleList(conv3x3(width, width, padding) for _ in range(config.num_hidden_layers))
        # one embedding projection before each hidden layer and before the down-projection
        self.embedding_projections = nn.ModuleList(
            embedding_projection(config.embedding_dim, width) for _ in range(config.num_hidden_layers + 1))
        self.down_projection = conv3x3(width, config.in_channels, padding)

    @property
    def receptive_field(self) -> int:
        """Side of the input square that one output pixel depends on."""
        return 2 * (self.config.num_hidden_layers + 2) + 1

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted noise (B, C, H, W) for noisy images x (B, C, H, W) at times t (B,)."""
        embedding = self.embedding(t, labels).to(x.dtype)
        h = self.up_projection(x)
        for layer, projection in zip(self.hidden_layers, self.embedding_projections):
            h = h + F.relu(layer(h + projection(embedding)[:, :, None, None]))
        h = h + self.embedding_projections[-1](embedding)[:, :, None, None]
        return self.down_projection(h)


class UNetBlock(nn.Module):
    """Embedding added at the input, then two 3x3 conv + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, embedding_dim: int, padding: str):
        super().__init__()
        self.projection = embedding_projection(embedding_dim, in_channels)
        self.conv1 = conv3x3(in_channels, out_channels, padding)
        self.conv2 = conv3x3(out_channels, out_channels, padding)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        x = x + self.projection(embedding)[:, :, None, None]
        return F.relu(self.conv2(F.relu(self.conv1(x))))


class UNet(nn.Module):
    """The paper's UNet: 3 scales of width, 2*width, 4*width channels (paper 64/128/256), max-pool
    down, transposed-convolution up, skip connections by concatenation. H and W must be divisible by 4."""

    def __init__(self, config: NetworkConfig):
        super().__init__()
        self.config = config
        w, e, padding = config.width, config.embedding_dim, config.padding
        self.embedding = ConditioningEmbedding(e, config.num_classes)
        self.encoder1 = UNetBlock(config.in_channels, w, e, padding)
        self.encoder2 = UNetBlock(w, 2 * w, e, padding)
        self.bottleneck = UNetBlock(2 * w, 4 * w, e, padding)
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2)
        self.decoder2 = UNetBlock(4 * w, 2 * w, e, padding)
        self.up1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2)
        self.decoder1 = UNetBlock(2 * w, w, e, padding)
        self.output = nn.Conv2d(w, config.in_channels, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted noise (B, C, H, W) for noisy images x (B, C, H, W) at times t (B,)."""
        if x.shape[-1] % 4 or x.shape[-2] % 4:
            raise PatchdbError(f"the UNet needs image sides divisible by 4, got {tuple(x.shape[-2:])}")
        embedding = self.embedding(t, labels).to(x.dtype)
        skip1 = self.encoder1(x, embedding)
        skip2 = self.encoder2(F.max_pool2d(skip1, 2), embedding)
        h = self.bottleneck(F.max_pool2d(skip2, 2), embedding)
        h = self.decoder2(torch.cat([self.up2(h), skip2], dim=1), embedding)
        h = self.decoder1(torch.cat([self.up1(h), skip1], dim=1), embedding)
        return self.output(h)


def build_network(config: NetworkConfig) -> nn.Module:
    """A freshly initialised ResNet or UNet for the config."""
    return ResNet(config) if config.architecture == "resnet" else UNet(config)


class NetworkScore:
    """A trained noise-prediction network as a score model: ``score = -eps / sqrt(beta(t))``.

    Call signature of every score model: ``model(x (B,C,H,W), t, labels (B,) int64 | None,
    patch_size=None) -> score (B,C,H,W)``. patch_size is accepted and ignored (a network has
    its own locality). Runs without gradients on the network's device and returns x's dtype and device.
    """

    def __init__(self, network: nn.Module, training: "TrainingProgress | None" = None):
        self.network = network.eval()
        self.training = training  # how far the weights had trained, where they come from a run folder
        self.config: NetworkConfig = network.config
        self.device = next(network.parameters()).device

    def weights_digest(self) -> str:
        """sha256 (hex) of the network's weights, names and values: the identity of a trained network, whatever its run
        folder is called or moved to."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.network.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def __call__(self, x: torch.Tensor, t: float, labels: torch.Tensor | None = None,
                 patch_size: int | None = None) -> torch.Tensor:
        if not 0.0 < t <= 1.0:
            raise PatchdbError(f"a network's score is defined for 0 < t <= 1, got t = {t}")
        if self.config.conditional and labels is None:
            raise PatchdbError("this network is class-conditional: give labels (--conditional or --label)")
        if x.shape[1] != self.config.in_channels:
            raise PatchdbError(f"the network expects {self.config.in_channels}-channel images, got {x.shape[1]} channels")
        with torch.no_grad():
            times = torch.full((x.shape[0],), t, device=self.device)
            net_labels = labels.to(self.device) if (labels is not None and self.config.conditional) else None
            eps = self.network(x.to(self.device, torch.float32), times, net_labels)
        return eps_to_score(eps, t).to(x.device, x.dtype)

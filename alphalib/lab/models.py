"""Reference models: the seed network, MLPs, a small CNN, a tiny character-level transformer, and two written the
way other libraries write them (a torchvision-style ResNet, a classifier on ``nn.TransformerEncoder``).

Importing this module registers the fast path's rules for the transformer's modules and its loss
(:func:`alphalib.fast.layers.register`, :data:`alphalib.fast.output.SEQUENCE_CROSS_ENTROPY`), as a user registers
rules for modules of their own."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..fast.calculus import attention, plus
from ..fast.layers import Sweep, register
from ..fast.output import SEQUENCE_CROSS_ENTROPY

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
}
"""The activation names :func:`mlp` accepts."""


class SimpleNet(nn.Sequential):
    """The seed experiment's network: ``fc1 = Linear(d_in, hidden) → ReLU → fc2 = Linear(hidden, d_out)``.

    A plain ``nn.Sequential`` (same parameter names and initialisation as the seed's module), so the probe's
    fast path covers it.

    Args:
        d_in: The inputs' dimension.
        hidden: The hidden layer's width.
        d_out: The outputs' dimension.

    Example:
        >>> SimpleNet()(torch.zeros(4, 10)).shape
        torch.Size([4, 1])
    """

    def __init__(self, d_in: int = 10, hidden: int = 5, d_out: int = 1):
        super().__init__(OrderedDict(fc1=nn.Linear(d_in, hidden), relu=nn.ReLU(), fc2=nn.Linear(hidden, d_out)))


def mlp(sizes: Sequence[int], activation: str = "relu") -> nn.Sequential:
    """Return ``Linear(sizes[0], sizes[1]) → act → … → Linear(sizes[-2], sizes[-1])``, no activation at the end.

    Args:
        sizes: The layers' widths, input first, output last (at least two).
        activation: The activation between the layers, a name in :data:`ACTIVATIONS`.

    Returns:
        The network, an ``nn.Sequential``.

    Raises:
        ValueError: If ``activation`` is unknown or ``sizes`` has fewer than two entries.

    Example:
        >>> mlp([64, 32, 10], "tanh")
        Sequential(
          (0): Linear(in_features=64, out_features=32, bias=True)
          (1): Tanh()
          (2): Linear(in_features=32, out_features=10, bias=True)
        )
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; valid names: {', '.join(ACTIVATIONS)}.")
    if len(sizes) < 2:
        raise ValueError(f"mlp needs at least an input and an output size, got sizes={list(sizes)}.")
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        if i:
            layers.append(ACTIVATIONS[activation]())
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


class SmallCNN(nn.Sequential):
    """``Conv3x3 → ReLU → Conv3x3 → ReLU → MaxPool2 → Flatten → Linear`` for square images.

    The convolutions keep the spatial size (padding 1), so the head sees ``2 * width * (input_size // 2) ** 2``
    features.

    Args:
        in_channels: The images' channels.
        n_classes: The number of outputs.
        width: The channels after the first convolution; ``2 * width`` after the second.
        input_size: The images' height and width: 8 for :func:`alphalib.lab.data.digits` (``flat=False``), 32 (with
            ``in_channels=3``) for CIFAR-sized images.

    Raises:
        ValueError: If ``input_size`` is below 2.
    """

    def __init__(self, in_channels: int = 1, n_classes: int = 10, width: int = 16, input_size: int = 8):
        if input_size < 2:
            raise ValueError(f"input_size must be at least 2 (one max-pool), got {input_size}.")
        super().__init__(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * (input_size // 2) ** 2, n_classes),
        )


class BasicBlock(nn.Module):
    """torchvision's ResNet block, written as torchvision writes it: one in-place ReLU used twice, and ``+=``."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """A small torchvision-style ResNet: a 3×3 stem, one :class:`BasicBlock` per width, pooling and a linear head.

    The blocks after the first have stride 2; global average pooling comes before the head. ``ResNet((16, 32, 64))``
    is a CIFAR-sized ResNet-8.

    Args:
        widths: The channels of the stem and each block.
        in_channels: The images' channels.
        n_classes: The number of outputs.
    """

    def __init__(self, widths: Sequence[int] = (16, 32, 64), in_channels: int = 3, n_classes: int = 10):
        super().__init__()
        ws = tuple(widths)
        self.conv1 = nn.Conv2d(in_channels, ws[0], 3, padding=1, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(ws[0]), nn.ReLU(inplace=True)
        self.layers = nn.Sequential(
            *[
                BasicBlock(c_in, c, 1 if i == 0 else 2)
                for i, (c_in, c) in enumerate(zip(ws[:1] + ws[:-1], ws, strict=True))
            ]
        )
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(ws[-1], n_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class EncoderClassifier(nn.Module):
    """Token embedding → ``nn.TransformerEncoder`` (pre-norm, batch first) → mean over positions → linear head.

    Args:
        vocab_size: The number of token ids.
        d_model: The embedding's width.
        n_heads: The attention heads per layer.
        n_layers: The encoder layers.
        d_ff: The width of each layer's feed-forward block.
        n_classes: The number of outputs.
        dropout: The encoder layers' dropout probability.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 64,
        n_heads: int = 4,
        n_layers: int = 2,
        d_ff: int = 128,
        n_classes: int = 10,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, d_ff, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(1))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through :func:`torch.nn.functional.scaled_dot_product_attention`."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads}).")
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.n_heads, -1).transpose(1, 2) for z in self.qkv(x).split(d, dim=-1))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """A pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))`` with a GELU MLP."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model), nn.Dropout(dropout)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """A tiny GPT-style causal decoder over characters: ``(B, T)`` int64 ids → ``(B, T, vocab_size)`` logits.

    Token plus learned position embeddings (``T <= block``), ``n_layers`` pre-LN :class:`Block` s, a final
    LayerNorm and a linear head. Train it with :func:`sequence_cross_entropy` on
    :func:`alphalib.lab.data.text`.

    Args:
        vocab_size: The number of token ids.
        d_model: The embeddings' width.
        n_heads: The attention heads per block (``d_model`` must be a multiple).
        n_layers: The number of blocks.
        block: The longest sequence it takes.
        dropout: The dropout probability after the embeddings, in attention and after each residual branch.

    Raises:
        ValueError: If ``d_model`` is not a multiple of ``n_heads``.

    Example:
        >>> model = CharTransformer(vocab_size=20, d_model=16, n_heads=2, n_layers=1, block=8)
        >>> model(torch.zeros(3, 5, dtype=torch.int64)).shape
        torch.Size([3, 5, 20])
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 64,
        n_heads: int = 4,
        n_layers: int = 2,
        block: int = 64,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.block = block
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(block, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(Block(d_model, n_heads, dropout) for _ in range(n_layers)))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        if t > self.block:
            raise ValueError(f"sequence length {t} exceeds the model's block size {self.block}.")
        h = self.drop(self.tok(x) + self.pos(torch.arange(t, device=x.device)))
        return self.head(self.ln(self.blocks(h)))


def sequence_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Return the cross-entropy of ``(B, T, V)`` logits against ``(B, T)`` targets, averaged over all positions.

    This is the ``loss_fn(model(inputs), targets)`` to pair with :class:`CharTransformer`.

    Args:
        logits: The model's outputs, ``(B, T, V)``.
        targets: The next tokens' ids, ``(B, T)`` int64.

    Returns:
        The mean cross-entropy, a scalar.
    """
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


SEQUENCE_CROSS_ENTROPY.add(sequence_cross_entropy)  # the fast path's output rule: softmax cross-entropy


# ---- the fast path's rules for the transformer above (alphalib.fast.layers.register) ----------------------------


@register(
    CausalSelfAttention,
    children={"qkv": {"output"}},
    check=lambda m: (
        "attention dropout draws its mask inside the fused kernel, where the fast path cannot replay it"
        if m.dropout > 0
        else None
    ),
)
def _attention(sw: Sweep, m: CausalSelfAttention, t: Tensor | None) -> Tensor | None:
    """Causal attention on the heads of the kept ``qkv`` output (:func:`alphalib.fast.calculus.attention`)."""
    qkv, t_qkv = sw.cap.outputs.pop(m.qkv).detach(), sw(m.qkv, t)
    if t_qkv is None:
        return sw(m.proj, None)
    b, n, d = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3

    def heads(z: Tensor) -> tuple[Tensor, ...]:
        return tuple(h.view(b, n, m.n_heads, -1).transpose(1, 2) for h in z.split(d, dim=-1))

    err = sw.cap.errors_in[m.proj].view(b, n, m.n_heads, -1).transpose(1, 2) if sw.exact else None
    (q, k, v), (tq, tk, tv) = heads(qkv), heads(t_qkv)
    t_out, term = attention(q, k, v, tq, tk, tv, err, causal=True)
    assert t_out is not None  # the tangents of q, k and v are all given
    if term is not None:
        sw.add(term)
    return sw(m.proj, t_out.transpose(1, 2).reshape(b, n, d))


@register(Block)
def _block(sw: Sweep, m: Block, t: Tensor | None) -> Tensor | None:
    """Mirror :meth:`Block.forward <alphalib.lab.models.Block.forward>` on tangents: residual connections add them."""
    t = plus(t, sw(m.drop, sw(m.attn, sw(m.ln1, t))))
    return plus(t, sw(m.mlp, sw(m.ln2, t)))


@register(CharTransformer)
def _char_transformer(sw: Sweep, m: CharTransformer, t: Tensor | None) -> Tensor | None:
    """Mirror :meth:`CharTransformer.forward <alphalib.lab.models.CharTransformer.forward>` (ids: no tangent)."""
    h = sw(m.drop, plus(sw(m.tok, None), sw(m.pos, None)))
    return sw(m.head, sw(m.ln, sw(m.blocks, h)))

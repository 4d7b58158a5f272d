"""The injected layer: a bank of membranes on one `nn.Linear`/`nn.Conv2d`, gated per sample.

The N membranes of a layer are stacked row-wise, `D` [R, in] and `U` [out, R] with R the sum of
their ranks, so the update `U (G * D x)` costs two thin matmuls whatever N is. Each row carries
its membrane's `alpha / rank`; gates arrive per membrane and are expanded to rows. When every row
shares its gates and the input has more positions than about half the layer's width, one op on a
transient `W + dW` is cheaper than the two thin matmuls (`merge_is_cheaper`), and holds one layer's
copy for the length of that op.

The bank never writes to the base layer's weight except in `fuse`, which swaps in a new tensor
and keeps the original object, so `unfuse` restores it bit for bit; a LoRA fused or unfused on
top in the meantime is replayed by PEFT on the restored tensor, as if the membranes had never
been fused.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook
from torch import nn

from .hooks import add_hook, remove_hook
from .membrane import LowRankPair

if TYPE_CHECKING:
    from .controller import ForwardGates, MembraneController

MEMBRANE_HOOK = "spm_membrane"
BANK_ATTRIBUTE = "spm_membranes"


class LayerShape(NamedTuple):
    """What a membrane's tensors must look like to adapt one base layer."""

    in_shape: tuple[int, ...]  # (in_features,) or (in_channels, kh, kw)
    out_features: int
    is_conv: bool

    def down(self, rank: int) -> tuple[int, ...]:
        return (rank, *self.in_shape)

    def up(self, rank: int) -> tuple[int, ...]:
        """The reference's `lora_up` shape: `[out, r]`, or `[out, r, 1, 1]` for a convolution."""
        return (self.out_features, rank, 1, 1) if self.is_conv else (self.out_features, rank)


def layer_shape(base: nn.Linear | nn.Conv2d) -> LayerShape:
    """The membrane shapes of a base layer: the one rule the bank, the compatibility check and the trainer use."""
    if isinstance(base, nn.Conv2d):
        return LayerShape((base.in_channels, *base.kernel_size), base.out_channels, True)
    return LayerShape((base.in_features,), base.out_features, False)


def bank_of(base: nn.Module) -> "MembraneBank | None":
    """The membrane bank attached to `base`, if any."""
    return getattr(base, BANK_ATTRIBUTE, None)


def is_quantized(weight: torch.Tensor) -> bool:
    """A weight stored quantized: bitsandbytes' integer storage, or a tensor subclass (torchao, quanto)."""
    return not weight.is_floating_point() or type(weight.data) is not torch.Tensor


class MembraneBank(nn.Module):
    """The stacked membranes of one base layer.

    The tensors are parameters so that `.to()` moves them and the trainer can optimise them; they
    are kept out of the UNet's state dict, which stays the user's model (save membranes with
    `save_spm`).
    """

    def __init__(self, base: nn.Linear | nn.Conv2d) -> None:
        super().__init__()
        shape = layer_shape(base)
        self.is_conv = shape.is_conv
        self.in_shape = shape.in_shape
        # Beside a quantized base the membranes stay in floating point (cast to the input's dtype per call).
        self.quantized_base = is_quantized(base.weight)
        dtype = torch.get_default_dtype() if self.quantized_base else base.weight.dtype
        factory = {"device": base.weight.device, "dtype": dtype}
        self.names: list[str] = []
        self.ranks: list[int] = []
        self.alphas: list[float] = []
        self.down = nn.Parameter(torch.empty(shape.down(0), **factory), requires_grad=False)
        self.up = nn.Parameter(torch.empty(shape.out_features, 0, **factory), requires_grad=False)
        self.register_buffer("row_scale", torch.empty(0, device=base.weight.device), persistent=False)
        self.register_buffer("row_owner", torch.empty(0, dtype=torch.long, device=base.weight.device), persistent=False)
        self.register_buffer("fused_original", None, persistent=False)
        self.fused_loras: list[str] = []  # the LoRAs PEFT had merged into `fused_original`

    # The bank's tensors belong to the membranes, not to the user's model: keep them out of
    # `unet.state_dict()` and let `unet.load_state_dict(..., strict=True)` ignore them.
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        return

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        return

    # ------------------------------------------------------------------ membership
    def add(self, name: str, module: LowRankPair, dtype: torch.dtype | None = None) -> None:
        down = module.down.to(self.down.device, dtype or self.down.dtype)
        up = module.up.reshape(module.up.shape[0], module.rank).to(self.up.device, dtype or self.up.dtype)
        requires_grad = self.down.requires_grad
        self.down = nn.Parameter(torch.cat([self.down.detach().to(down.dtype), down]), requires_grad=requires_grad)
        self.up = nn.Parameter(torch.cat([self.up.detach().to(up.dtype), up], dim=1), requires_grad=requires_grad)
        self.row_scale = torch.cat([self.row_scale, torch.full((module.rank,), module.scale, device=self.row_scale.device)])
        self.names.append(name)
        self.ranks.append(module.rank)
        self.alphas.append(module.alpha)

    def remove(self, name: str) -> None:
        index = self.names.index(name)
        start = sum(self.ranks[:index])
        keep = torch.ones(self.down.shape[0], dtype=torch.bool, device=self.down.device)
        keep[start : start + self.ranks[index]] = False
        self.down = nn.Parameter(self.down.detach()[keep], requires_grad=self.down.requires_grad)
        self.up = nn.Parameter(self.up.detach()[:, keep], requires_grad=self.up.requires_grad)
        self.row_scale = self.row_scale[keep.to(self.row_scale.device)]
        del self.names[index], self.ranks[index], self.alphas[index]

    def pair(self, name: str) -> LowRankPair:
        """One membrane's weights, back in the reference shapes."""
        index = self.names.index(name)
        start, rank = sum(self.ranks[:index]), self.ranks[index]
        down = self.down.detach()[start : start + rank].clone()
        up = self.up.detach()[:, start : start + rank].clone()
        if self.is_conv:
            up = up[:, :, None, None]
        return LowRankPair(down=down, up=up, alpha=self.alphas[index])

    def index_rows(self, order: list[str]) -> None:
        """Point each row at its membrane's position in the controller's gate vector."""
        owner = [order.index(name) for name, rank in zip(self.names, self.ranks) for _ in range(rank)]
        self.row_owner = torch.tensor(owner, dtype=torch.long, device=self.row_scale.device)

    # ------------------------------------------------------------------ math
    def row_coefficients(self, gates: torch.Tensor) -> torch.Tensor:
        """Gates [..., N] per membrane -> per-row coefficients [..., R] (gate * alpha / rank)."""
        gates = gates.to(self.row_scale.device, torch.float32)
        return gates.index_select(-1, self.row_owner) * self.row_scale.float()

    def delta_weight(self, gates: torch.Tensor) -> torch.Tensor:
        """`sum_i g_i * scale_i * U_i D_i` in the base weight's shape, computed in fp32."""
        coef = self.row_coefficients(gates)
        down = self.down.detach().float().flatten(1)
        delta = (self.up.detach().float() * coef) @ down
        return delta.view(self.up.shape[0], *self.in_shape)

    def scaled_up(self, gates: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`U` with each row's coefficient folded in, for gates [N] shared by all rows: `U diag(c) D x`
        is the delta with no per-row scaling left to do."""
        return (self.up.detach().float() * self.row_coefficients(gates)).to(dtype)

    def merged_weight(self, weight: torch.Tensor, gates: torch.Tensor,
                      scaled_up: torch.Tensor | None = None) -> torch.Tensor:
        """`W + sum_i g_i * scale_i * U_i D_i` for gates [N], as one new tensor in W's dtype and shape
        (one `addmm`: a single copy of the layer; the base weight is not touched). `scaled_up`: this
        bank's `scaled_up(gates, W's dtype)`, when the caller keeps it."""
        up = self.scaled_up(gates, weight.dtype) if scaled_up is None else scaled_up
        down = self.down.detach().flatten(1).to(weight.device, weight.dtype)
        return torch.addmm(weight.flatten(1), up.to(weight.device, weight.dtype), down).view_as(weight)

    @property
    def can_merge(self) -> bool:
        """Whether a forward may run on merged weights: not beside a quantized base (the sum would be
        quantized again) and not while the membranes are trained (the merge carries no gradient)."""
        return not self.quantized_base and not self.down.requires_grad

    def merge_is_cheaper(self, x: torch.Tensor) -> bool:
        """Whether one base op on `W + dW` costs fewer multiply-adds than the stacked form for input `x`:
        the merge pays R * in * out once per forward, the stacked form R * (in + out) per input position,
        so the merge wins once a forward has more than in * out / (in + out) positions (about half the
        layer's width: large images, long text states)."""
        in_features, out_features = math.prod(self.in_shape), self.up.shape[0]
        positions = x.numel() // (x.shape[1] if self.is_conv else x.shape[-1])
        return positions * (in_features + out_features) > in_features * out_features

    def add_delta(self, base: nn.Module, x: torch.Tensor, out: torch.Tensor, gates: torch.Tensor,
                  scaled_up: torch.Tensor | None = None) -> torch.Tensor:
        """`out + U (G * D x)` for gates [N] (shared) or [B, N] (one row of gates per sample); for shared
        gates `scaled_up` (`scaled_up(gates, x's dtype)`, kept by the caller) replaces `U` and `G`.

        `out` is the base op's output, a new tensor: the delta is added into it where it can be (a
        contiguous tensor of the same dtype that does not share the input's storage, outside autograd),
        as one `addmm_` for Linear layers, which saves writing the delta apart and a second pass over
        the output (2-5 % of a wide layer's time on CPU at N = 20). Under autograd (training) the sum
        is a new tensor: some base ops return a custom Function's view, which autograd forbids
        changing in place (bitsandbytes' 8-bit matmul)."""
        down = self.down.to(x.dtype)
        if scaled_up is None:
            up, coef = self.up.to(x.dtype), self.row_coefficients(gates).to(x.dtype)
        else:
            up, coef = scaled_up, None
        recorded = torch.is_grad_enabled() and (out.requires_grad or x.requires_grad or down.requires_grad)
        in_place = (not recorded and out.dtype == x.dtype and out.is_contiguous()
                    and out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr())
        if self.is_conv:
            hidden = F.conv2d(x, down, None, base.stride, base.padding, base.dilation, base.groups)
            if coef is not None:
                hidden = hidden * coef.view(*coef.shape, 1, 1)
            delta = F.conv2d(hidden, up[:, :, None, None])
            return out.add_(delta) if in_place else out + delta
        hidden = F.linear(x, down)
        if coef is not None:
            if coef.dim() == 2:
                coef = coef.view(coef.shape[0], *([1] * (hidden.dim() - 2)), coef.shape[1])
            hidden = hidden * coef
        if not in_place:
            return out + F.linear(hidden, up)
        out.view(-1, out.shape[-1]).addmm_(hidden.reshape(-1, hidden.shape[-1]), up.T)
        return out

    # ------------------------------------------------------------------ fuse
    @torch.no_grad()
    def fuse(self, base: nn.Module, gates: torch.Tensor, lora: nn.Module | None = None) -> None:
        """Swap a merged weight into the base layer, keeping the original tensor for `unfuse`.

        `lora` is the PEFT layer wrapping `base`, if any: which of its adapters are merged now."""
        if self.fused_original is not None:
            raise RuntimeError("This layer is already fused; call `unfuse_spm()` first.")
        if self.quantized_base:
            raise RuntimeError(
                f"Cannot fuse membranes into quantized weights ({type(base.weight.data).__name__}, "
                f"{base.weight.dtype}): the sum would have to be quantized again, which rounds the membrane away "
                "and cannot be undone exactly. Membranes act beside a quantized base unfused: skip `fuse_spm()`."
            )
        original = base.weight.data
        merged = (original.float() + self.delta_weight(gates).to(original.device)).to(original.dtype)
        self.fused_original = original
        self.fused_loras = list(lora.merged_adapters) if lora is not None else []
        base.weight.data = merged

    @torch.no_grad()
    def unfuse(self, base: nn.Module, lora: nn.Module | None = None) -> None:
        """Put the original tensor back. If LoRAs were fused or unfused since `fuse` (`lora`'s merged
        adapters differ), PEFT replays that change on it, so the weight is exactly what those LoRA calls
        alone would have left, in any order of the four calls."""
        if self.fused_original is None:
            return
        base.weight.data = self.fused_original
        self.fused_original = None
        merged_now = list(lora.merged_adapters) if lora is not None else []
        if merged_now != self.fused_loras:
            lora.merged_adapters = list(self.fused_loras)  # what the restored tensor holds
            if self.fused_loras:
                lora.unmerge()
            if merged_now:
                lora.merge(adapter_names=merged_now)
        self.fused_loras = []


class MembraneLayerHook(ModelHook):
    """Runs a base layer with its membrane bank, reading the gates of the current UNet call from
    the controller that owns the UNet (state lives beside the UNet, not in globals)."""

    def __init__(self, bank: MembraneBank, controller: "MembraneController") -> None:
        super().__init__()
        self.bank = bank
        self.controller = controller

    def new_forward(self, module: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Rows that share their gates run the base op once on `W + dW` where that is cheaper
        (`set_spm_memory("auto")`, the default) or kept for the call (`"merged"`); otherwise, and always
        with per-row gates, the stacked form `W x + U (G * D x)`."""
        forward_gates = self.controller.gates_for(x)
        if forward_gates is None:
            return self.fn_ref.original_forward(x, *args, **kwargs)
        gates, scaled_up = forward_gates.gates, None
        if gates.dim() == 1 and self.bank.can_merge:
            if forward_gates.call_key is not None:
                if forward_gates.keep_merged:
                    return self._run(module, x, self._kept(self.controller.call.merged, forward_gates.call_key,
                                                           lambda: self.bank.merged_weight(module.weight.detach(), gates)))
                scaled_up = self._kept(self.controller.call.scaled_up, (forward_gates.call_key, x.dtype),
                                       lambda: self.bank.scaled_up(gates, x.dtype))
            if forward_gates.transient_merge and self.bank.merge_is_cheaper(x):  # one layer's copy, freed after the op
                return self._run(module, x, self.bank.merged_weight(module.weight.detach(), gates, scaled_up))
        return self.bank.add_delta(module, x, self.fn_ref.original_forward(x, *args, **kwargs), gates, scaled_up)

    def _kept(self, store: dict[int, tuple[tuple, torch.Tensor]], key: tuple,
              make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """This layer's tensor in one of the running call's stores (so concurrent calls never share or
        drop each other's), made again when `key` (the gates, the membranes' version) changes."""
        cached = store.get(id(self))
        if cached is None or cached[0] != key:
            cached = store[id(self)] = (key, make())
        return cached[1]

    def _run(self, module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's op with another weight."""
        if self.bank.is_conv:
            return module._conv_forward(x, weight, module.bias)
        return F.linear(x, weight, module.bias)


def attach_bank(base: nn.Module, controller: "MembraneController") -> MembraneBank:
    """Give `base` a bank and a hook (idempotent) and return the bank."""
    bank = bank_of(base)
    if bank is None:
        bank = MembraneBank(base)
        base.add_module(BANK_ATTRIBUTE, bank)
        add_hook(base, MembraneLayerHook(bank, controller), MEMBRANE_HOOK)
    return bank


def detach_bank(base: nn.Module) -> None:
    """Remove the hook and the bank; the base layer is as it was before `attach_bank`."""
    bank = bank_of(base)
    if bank is not None:
        bank.unfuse(base)
        delattr(base, BANK_ATTRIBUTE)
    remove_hook(base, MEMBRANE_HOOK)

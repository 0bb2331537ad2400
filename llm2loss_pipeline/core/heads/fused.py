"""Every member's first layer as one matrix, and the forward and backward that train them with it.

During training the first layers of all members, linear and mlp alike, are columns of one matrix
`weight` [d, L + K*H] (L linear members, then K mlp members of hidden width H) with one bias
vector [L + K*H], so that a step makes one [B, d] x [d, L + K*H] product forward and one
[d, B] x [B, L + K*H] product for the weight gradient, whatever the mix of architectures. Held as
separate stacks, the ten linear members cost two more products per step that are only ten columns
wide, which run at a fraction of the rate of the wide one, plus their share of autograd's
bookkeeping.

`AllMembers` has a hand-written backward rather than autograd's: autograd would materialise the
gradient of each column block of the pre-activations in a zero-filled buffer of the full width
and add them, where here both blocks are written into one buffer; `tests/test_heads.py` checks it
against autograd with `torch.autograd.gradcheck` in float64.

Training steps (`FusedParameters.step_forward`) also reuse their memory. Every step used to
allocate its batch-sized temporaries afresh (pre-activations, the second layer's product, the
pre-activations' gradient: 1.3 MB each at 20 members) and a new 2.6 MB weight gradient; glibc
hands blocks of that size back to the kernel when they are freed and faults them in again, one
page at a time, on the next step. Now those temporaries are buffers of the `FusedParameters` and
the parameters' gradients are written into their `.grad` in place (overwriting the last step's,
so no `zero_grad` is needed). A second `step_forward` before the first one's backward overwrites
the buffers the first saved; autograd's version counters turn that into an error, not a wrong
gradient.
"""

from __future__ import annotations

import torch

from llm2loss_pipeline.core.heads.ensemble import second_layer


class AllMembers(torch.autograd.Function):
    """Outputs [L + K, n] of all members on inputs x [n, d]; rows are linear members, then mlp.

    weight [d, L + K*H] and bias [L + K*H] hold every member's first layer (a linear member's
    whole layer); w2 [K, H] and b2 [K] are the mlp members' second layers. With `owner` (the
    `FusedParameters` the leaves belong to) temporaries are its reused buffers and the gradients
    go into the leaves' `.grad` in place (backward returns None for them); without it the usual
    contract holds and backward returns them.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, w2, b2, n_linear: int, owner: FusedParameters | None = None):
        width = weight.shape[1]
        mlp, hidden = w2.shape
        pre = torch.addmm(bias[None, :], x, weight, out=_buffer(owner, "pre", x, width))
        act = pre[:, n_linear:].relu_()  # in place: the mlp block of `pre` becomes the activations
        mlp_out = second_layer(act, w2, b2, out=_buffer(owner, "product", x, mlp * hidden))
        ctx.save_for_backward(x, act, w2)
        ctx.n_linear, ctx.owner = n_linear, owner
        return torch.cat([pre[:, :n_linear], mlp_out], dim=1).T

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.needs_input_grad[0]:
            raise NotImplementedError("AllMembers trains the heads; it has no gradient for x")
        x, act, w2 = ctx.saved_tensors
        n_linear, owner = ctx.n_linear, ctx.owner
        n = x.shape[0]
        mlp, hidden = w2.shape
        grad = grad_out.T  # [n, L + K]
        grad_mlp = grad[:, n_linear:]
        grad_pre = _buffer(owner, "grad_pre", x, n_linear + mlp * hidden)
        grad_pre[:, :n_linear] = grad[:, :n_linear]
        hidden_block = grad_pre[:, n_linear:]
        torch.mul(grad_mlp[:, :, None], w2, out=hidden_block.view(n, mlp, hidden))
        torch.ops.aten.threshold_backward.grad_input(
            hidden_block, act, 0.0, grad_input=hidden_block
        )
        into = owner.gradient_buffers() if owner is not None else [None] * 4
        grad_weight = torch.mm(x.T, grad_pre, out=into[0])
        grad_bias = torch.sum(grad_pre, dim=0, out=into[1])
        # K products [1, n] x [n, H]: 1.5x faster than a broadcast multiply and a sum over n.
        grad_w2 = torch.bmm(
            grad_mlp.T.unsqueeze(1),
            act.view(n, mlp, hidden).transpose(0, 1),
            out=None if into[2] is None else into[2].unsqueeze(1),
        ).squeeze(1)
        grad_b2 = torch.sum(grad_mlp, dim=0, out=into[3])
        if owner is not None:
            return None, None, None, None, None, None, None
        return None, grad_weight, grad_bias, grad_w2, grad_b2, None, None


def _buffer(owner: FusedParameters | None, name: str, x: torch.Tensor, cols: int) -> torch.Tensor:
    """[len(x), cols]: the owner's reused buffer, or fresh memory without an owner."""
    rows = x.shape[0]
    return x.new_empty(rows, cols) if owner is None else owner.buffer(name, rows, cols)


class FusedParameters:
    """The trainable leaves of all members in `AllMembers`' layout, and views of them per
    architecture in the ensemble's layout (`ensemble.py`: linear weight [L, d], bias [L]; mlp w1
    [K, d, H], b1 [K, H], w2 [K, H], b2 [K]), which see every optimiser step without a copy."""

    def __init__(self, stacks: dict[str, dict[str, torch.Tensor]], device: torch.device) -> None:
        linear, mlp = stacks.get("linear"), stacks.get("mlp")
        if linear is None and mlp is None:
            raise ValueError("no members: stacks hold neither linear nor mlp parameters")
        first_weight, first_bias = [], []
        if linear is not None:
            first_weight.append(linear["weight"].T)
            first_bias.append(linear["bias"])
        if mlp is not None:
            members, dim, hidden = mlp["w1"].shape
            first_weight.append(mlp["w1"].permute(1, 0, 2).reshape(dim, members * hidden))
            first_bias.append(mlp["b1"].reshape(members * hidden))
            w2, b2 = mlp["w2"], mlp["b2"]
        else:
            dtype = first_weight[0].dtype
            w2, b2 = torch.zeros(0, 1, dtype=dtype), torch.zeros(0, dtype=dtype)
        self.n_linear = 0 if linear is None else linear["weight"].shape[0]
        self.weight = torch.cat(first_weight, dim=1).to(device).requires_grad_(True)
        self.bias = torch.cat(first_bias).to(device).requires_grad_(True)
        self.w2 = w2.to(device, copy=True).requires_grad_(True)
        self.b2 = b2.to(device, copy=True).requires_grad_(True)
        self._buffers: dict[str, torch.Tensor] = {}

    def leaves(self) -> dict[str, torch.Tensor]:
        """The tensors the optimiser steps, by name (w2 and b2 only if there are mlp members)."""
        named = {"weight": self.weight, "bias": self.bias, "w2": self.w2, "b2": self.b2}
        return {name: t for name, t in named.items() if t.numel()}

    def views(self) -> dict[str, dict[str, torch.Tensor]]:
        stacks: dict[str, dict[str, torch.Tensor]] = {}
        n_linear = self.n_linear
        if n_linear:
            stacks["linear"] = {"weight": self.weight[:, :n_linear].T, "bias": self.bias[:n_linear]}
        members, hidden = self.w2.shape
        if members:
            dim = self.weight.shape[0]
            stacks["mlp"] = {
                "w1": self.weight[:, n_linear:].view(dim, members, hidden).permute(1, 0, 2),
                "b1": self.bias[n_linear:].view(members, hidden),
                "w2": self.w2,
                "b2": self.b2,
            }
        return stacks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs [L + K, n] of every member on x [n, d] (see `AllMembers`)."""
        return AllMembers.apply(x, self.weight, self.bias, self.w2, self.b2, self.n_linear)

    def step_forward(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` for a training step: its backward writes the gradients into the leaves'
        `.grad`, overwriting them, and its temporaries are this object's reused buffers."""
        return AllMembers.apply(x, self.weight, self.bias, self.w2, self.b2, self.n_linear, self)

    def buffer(self, name: str, rows: int, cols: int) -> torch.Tensor:
        """A [rows, cols] buffer that later calls with the same name reuse: the first rows of one
        allocated for the most rows asked for (an epoch's last batch is smaller)."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != cols:
            buf = self.weight.new_empty(rows, cols, requires_grad=False)
            self._buffers[name] = buf
        return buf[:rows]

    def gradient_buffers(self) -> list[torch.Tensor]:
        """The `.grad` of weight, bias, w2 and b2, allocated on first use."""
        for leaf in (self.weight, self.bias, self.w2, self.b2):
            if leaf.grad is None:
                leaf.grad = torch.empty_like(leaf, requires_grad=False)
        return [self.weight.grad, self.bias.grad, self.w2.grad, self.b2.grad]

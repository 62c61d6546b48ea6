"""Chapter 3's checks reject the stubs and plausible wrong answers, and accept the solutions and
correct answers written differently."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llama_from_scratch.course.checks.ch03_rmsnorm_swiglu import CHECKS

from answers import fails_on, solution, solution_and_stub_tests, stub

SOLUTION = solution("ch03_rmsnorm_swiglu")
STUB = stub("ch03_rmsnorm_swiglu")
fails = fails_on(CHECKS)
test_solution_passes, test_stub_fails = solution_and_stub_tests(CHECKS, SOLUTION, STUB)


# ----- silu_grad ----------------------------------------------------------------------------------

def silu_grad_sigmoid_only(x):            # the derivative of sigmoid, not of silu
    s = torch.sigmoid(x)
    return s * (1 - s)


def silu_grad_no_one_minus(x):            # sigmoid' taken as sigmoid
    s = torch.sigmoid(x)
    return s + x * s


def silu_grad_exp_formula(x):             # right on paper, inf / inf = nan for x = -1e4
    e = torch.exp(-x)
    return (1 + e + x * e) / (1 + e) ** 2


def silu_grad_is_silu(x):
    return x * torch.sigmoid(x)


@pytest.mark.parametrize("wrong", [silu_grad_sigmoid_only, silu_grad_no_one_minus, silu_grad_exp_formula,
                                   silu_grad_is_silu])
def test_silu_grad_wrong(wrong):
    assert fails("silu_grad", wrong)


def test_silu_grad_other_form_passes():
    def silu_grad(x):                     # s + silu(x) * (1 - s), in float64
        s = torch.sigmoid(x.double())
        return (s + x.double() * s * (1 - s)).to(x.dtype)
    assert CHECKS["silu_grad"](silu_grad) is None


# ----- rms_norm_backward --------------------------------------------------------------------------

def _rms_parts(x, eps):
    h = x.float()
    r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return h, r, h * r


def rms_backward_constant_r(x, weight, grad_output, eps=1e-6):     # forgets that r depends on x
    _, r, x_hat = _rms_parts(x, eps)
    return grad_output * weight * r, (grad_output * x_hat).reshape(-1, x.shape[-1]).sum(0)


def rms_backward_weight_first_dim(x, weight, grad_output, eps=1e-6):  # sums the gain's gradient over dim 0 only
    _, r, x_hat = _rms_parts(x, eps)
    u = grad_output * weight
    return r * (u - x_hat * (u * x_hat).mean(-1, keepdim=True)), (grad_output * x_hat).sum(0)


def rms_backward_eps_outside(x, weight, grad_output, eps=1e-6):     # r = 1 / (sqrt(ms) + eps)
    h = x.float()
    r = 1 / (h.pow(2).mean(-1, keepdim=True).sqrt() + eps)
    x_hat, u = h * r, grad_output * weight
    return r * (u - x_hat * (u * x_hat).mean(-1, keepdim=True)), (grad_output * x_hat).reshape(-1, x.shape[-1]).sum(0)


def rms_backward_sum_not_mean(x, weight, grad_output, eps=1e-6):    # sum over d instead of mean
    _, r, x_hat = _rms_parts(x, eps)
    u = grad_output * weight
    return r * (u - x_hat * (u * x_hat).sum(-1, keepdim=True)), (grad_output * x_hat).reshape(-1, x.shape[-1]).sum(0)


def rms_backward_sign(x, weight, grad_output, eps=1e-6):            # + instead of -
    _, r, x_hat = _rms_parts(x, eps)
    u = grad_output * weight
    return r * (u + x_hat * (u * x_hat).mean(-1, keepdim=True)), (grad_output * x_hat).reshape(-1, x.shape[-1]).sum(0)


def rms_backward_default_eps(x, weight, grad_output, eps=1e-5):     # right formula, wrong default eps
    return SOLUTION["rms_norm_backward"](x, weight, grad_output, eps)


@pytest.mark.parametrize("wrong", [rms_backward_constant_r, rms_backward_weight_first_dim, rms_backward_eps_outside,
                                   rms_backward_sum_not_mean, rms_backward_sign, rms_backward_default_eps])
def test_rms_norm_backward_wrong(wrong):
    assert fails("rms_norm_backward", wrong)


def test_rms_norm_backward_other_form_passes():
    def rms_norm_backward(x, weight, grad_output, eps=1e-6):   # r * u - x r^3 mean(u x), in float64
        h, g, w = x.double(), grad_output.double(), weight.double()
        r = (h.pow(2).mean(-1, keepdim=True) + eps).pow(-0.5)
        u = g * w
        grad_x = r * u - h * r.pow(3) * (u * h).mean(-1, keepdim=True)
        grad_w = torch.einsum("...d,...d->d", g, h * r)
        return grad_x.to(x.dtype), grad_w.to(weight.dtype)
    assert CHECKS["rms_norm_backward"](rms_norm_backward) is None


# ----- RMSNorm ------------------------------------------------------------------------------------

def make_rmsnorm(forward_fn, backward_fn=None, param="weight", default_eps=1e-6):
    """An RMSNorm class with a custom Function built from the given pieces."""
    backward_fn = backward_fn or SOLUTION["rms_norm_backward"]

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, eps):
            ctx.save_for_backward(x, weight)
            ctx.eps = eps
            return forward_fn(x, weight, eps)

        @staticmethod
        def backward(ctx, grad_output):
            x, weight = ctx.saved_tensors
            return (*backward_fn(x, weight, grad_output, ctx.eps), None)

    class Norm(nn.Module):
        def __init__(self, dim, eps=default_eps):
            super().__init__()
            setattr(self, param, nn.Parameter(torch.ones(dim)))
            self.eps = eps

        def forward(self, x):
            return Fn.apply(x, getattr(self, param), self.eps)

    return Norm


def forward_right(x, weight, eps):
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def forward_no_upcast(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def forward_gain_before_cast(x, weight, eps):
    h = x.float()
    return (weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("wrong", [
    make_rmsnorm(forward_no_upcast),                                  # 16-bit results differ / overflow
    make_rmsnorm(forward_gain_before_cast),                           # bfloat16 x, float32 gain: wrong dtype
    make_rmsnorm(forward_right, param="gamma"),                       # does not load a transformers state dict
    make_rmsnorm(forward_right, backward_fn=rms_backward_constant_r), # wrong backward
    make_rmsnorm(forward_right, default_eps=1e-5),                    # wrong default eps
])
def test_rmsnorm_wrong(wrong):
    assert fails("RMSNorm", wrong)


def test_rmsnorm_other_form_passes():
    class Fn(torch.autograd.Function):                               # saves x_hat and r instead of x
        @staticmethod
        def forward(ctx, x, weight, eps):
            r = x.float().square().mean(-1, keepdim=True).add(eps).rsqrt()
            x_hat = x.float() * r
            ctx.save_for_backward(x_hat, r, weight)
            ctx.x_dtype = x.dtype
            return weight * x_hat.to(x.dtype)

        @staticmethod
        def backward(ctx, grad_output):
            x_hat, r, weight = ctx.saved_tensors
            g = grad_output.float()
            u = g * weight.float()
            grad_x = r * (u - x_hat * (u * x_hat).mean(-1, keepdim=True))
            grad_w = (g * x_hat).flatten(0, -2).sum(0) if g.dim() > 1 else g * x_hat
            return grad_x.to(ctx.x_dtype), grad_w.to(weight.dtype), None

    class RMSNorm(nn.Module):
        def __init__(self, dim, eps=1e-6):
            super().__init__()
            self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

        def forward(self, x):
            return Fn.apply(x, self.weight, self.eps)

    assert CHECKS["RMSNorm"](RMSNorm) is None


# ----- swiglu_backward ----------------------------------------------------------------------------

def _swiglu_parts(x, w_gate, w_up, w_down, grad_output):
    x2, g = x.reshape(-1, x.shape[-1]), grad_output.reshape(-1, w_down.shape[0])
    a, b = x2 @ w_gate.T, x2 @ w_up.T
    return x2, g, a, b, a * torch.sigmoid(a), g @ w_down


def swiglu_backward_sigmoid_grad(x, w_gate, w_up, w_down, grad_output):   # sigmoid' where silu' belongs
    x2, g, a, b, act, grad_h = _swiglu_parts(x, w_gate, w_up, w_down, grad_output)
    s = torch.sigmoid(a)
    grad_a, grad_b = grad_h * b * s * (1 - s), grad_h * act
    return ((grad_a @ w_gate + grad_b @ w_up).reshape(x.shape), grad_a.T @ x2, grad_b.T @ x2, g.T @ (act * b))


def swiglu_backward_gate_branch_only(x, w_gate, w_up, w_down, grad_output):  # forgets x also feeds up_proj
    x2, g, a, b, act, grad_h = _swiglu_parts(x, w_gate, w_up, w_down, grad_output)
    s = torch.sigmoid(a)
    grad_a, grad_b = grad_h * b * s * (1 + a * (1 - s)), grad_h * act
    return ((grad_a @ w_gate).reshape(x.shape), grad_a.T @ x2, grad_b.T @ x2, g.T @ (act * b))


def swiglu_backward_transposed(x, w_gate, w_up, w_down, grad_output):   # x^T grad_a instead of grad_a^T x
    x2, g, a, b, act, grad_h = _swiglu_parts(x, w_gate, w_up, w_down, grad_output)
    s = torch.sigmoid(a)
    grad_a, grad_b = grad_h * b * s * (1 + a * (1 - s)), grad_h * act
    return ((grad_a @ w_gate + grad_b @ w_up).reshape(x.shape), x2.T @ grad_a, x2.T @ grad_b, (act * b).T @ g)


def swiglu_backward_first_sequence(x, w_gate, w_up, w_down, grad_output):  # weight grads from x[0] only
    grads = SOLUTION["swiglu_backward"](x, w_gate, w_up, w_down, grad_output)
    if x.dim() < 3:
        return grads
    first = SOLUTION["swiglu_backward"](x[:1], w_gate, w_up, w_down, grad_output[:1])
    return (grads[0], *first[1:])


def swiglu_backward_swapped_branches(x, w_gate, w_up, w_down, grad_output):  # silu on the up branch
    return SOLUTION["swiglu_backward"](x, w_up, w_gate, w_down, grad_output)


@pytest.mark.parametrize("wrong", [swiglu_backward_sigmoid_grad, swiglu_backward_gate_branch_only,
                                   swiglu_backward_transposed, swiglu_backward_first_sequence,
                                   swiglu_backward_swapped_branches])
def test_swiglu_backward_wrong(wrong):
    assert fails("swiglu_backward", wrong)


def test_swiglu_backward_other_form_passes():
    def swiglu_backward(x, w_gate, w_up, w_down, grad_output):    # einsum over the leading dims, float64
        xd, gd = x.double(), grad_output.double()
        wg, wu, wd = w_gate.double(), w_up.double(), w_down.double()
        a, b = xd @ wg.T, xd @ wu.T
        s = torch.sigmoid(a)
        act = a * s
        grad_h = gd @ wd
        grad_a, grad_b = grad_h * b * (s + act * (1 - s)), grad_h * act
        grads = (grad_a @ wg + grad_b @ wu, torch.einsum("...h,...d->hd", grad_a, xd),
                 torch.einsum("...h,...d->hd", grad_b, xd), torch.einsum("...d,...h->dh", gd, act * b))
        return tuple(t.to(x.dtype) for t in grads)
    assert CHECKS["swiglu_backward"](swiglu_backward) is None


# ----- SwiGLU -------------------------------------------------------------------------------------

def make_swiglu(forward_fn=None, backward_fn=None, names=("gate_proj", "up_proj", "down_proj"), bias=False):
    backward_fn = backward_fn or SOLUTION["swiglu_backward"]
    forward_fn = forward_fn or (lambda x, wg, wu, wd: F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd))

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, wg, wu, wd):
            ctx.save_for_backward(x, wg, wu, wd)
            return forward_fn(x, wg, wu, wd)

        @staticmethod
        def backward(ctx, grad_output):
            return backward_fn(*ctx.saved_tensors, grad_output)

    class MLP(nn.Module):
        def __init__(self, dim, hidden_dim):
            super().__init__()
            setattr(self, names[0], nn.Linear(dim, hidden_dim, bias=bias))
            setattr(self, names[1], nn.Linear(dim, hidden_dim, bias=bias))
            setattr(self, names[2], nn.Linear(hidden_dim, dim, bias=bias))

        def forward(self, x):
            return Fn.apply(x, *(getattr(self, n).weight for n in names))

    return MLP


def swapped_order_backward(x, wg, wu, wd, grad_output):          # gradients of gate and up swapped
    gx, gg, gu, gd = SOLUTION["swiglu_backward"](x, wg, wu, wd, grad_output)
    return gx, gu, gg, gd


@pytest.mark.parametrize("wrong", [
    make_swiglu(forward_fn=lambda x, wg, wu, wd: F.linear(F.linear(x, wg) * F.silu(F.linear(x, wu)), wd)),  # silu on up
    make_swiglu(bias=True),                                       # biases do not belong in the state dict
    make_swiglu(names=("w1", "w3", "w2")),                        # Meta's names, not transformers'
    make_swiglu(backward_fn=swapped_order_backward),              # gradients returned in the wrong order
    make_swiglu(forward_fn=lambda x, wg, wu, wd: F.linear(F.silu(F.linear(x.float(), wg.float()))   # always float32
                                                          * F.linear(x.float(), wu.float()), wd.float())),
])
def test_swiglu_wrong(wrong):
    assert fails("SwiGLU", wrong)


def test_swiglu_other_form_passes():
    class Fn(torch.autograd.Function):                            # one fused gate+up product
        @staticmethod
        def forward(ctx, x, wg, wu, wd):
            ctx.save_for_backward(x, wg, wu, wd)
            a, b = F.linear(x, torch.cat([wg, wu])).chunk(2, dim=-1)
            return F.linear(F.silu(a) * b, wd)

        @staticmethod
        def backward(ctx, grad_output):
            return SOLUTION["swiglu_backward"](*ctx.saved_tensors, grad_output)

    class SwiGLU(nn.Module):
        def __init__(self, dim, hidden_dim):
            super().__init__()
            self.down_proj = nn.Linear(hidden_dim, dim, bias=False)
            self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
            self.up_proj = nn.Linear(dim, hidden_dim, bias=False)

        def forward(self, x):
            return Fn.apply(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)

    assert CHECKS["SwiGLU"](SwiGLU) is None

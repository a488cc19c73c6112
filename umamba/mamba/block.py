"""The Mamba block (selective state-space model), readable in one file.

Parameter names, shapes and initialisation follow ``mamba_ssm.modules.mamba_simple.Mamba`` (v1),
so a state_dict moves between the two with ``strict=True``. Only the selective scan differs
between backends (see :mod:`umamba.mamba.scan`); everything else is plain PyTorch.

Shapes (b = batch, l = length, d = d_model, e = d_inner = expand * d_model, n = d_state,
r = dt_rank)::

    x (b, l, d) --in_proj--> xz (b, 2e, l) --split--> x (b, e, l), z (b, e, l)
    x --causal depthwise conv1d (k = d_conv) + SiLU--> x (b, e, l)
    x --x_proj--> [dt (b, l, r) | B (b, l, n) | C (b, l, n)];  dt --dt_proj--> (b, e, l)
    y = selective_scan(x, dt, A = -exp(A_log), B, C, D, z, dt_proj.bias, softplus)  (b, e, l)
    y --out_proj--> (b, l, d)

With ``bidirectional=True`` a second conv/x_proj/dt_proj/A/D set (suffix ``_b``, as in Vision
Mamba's "v2" block) scans the time-reversed sequence; the two gated outputs are averaged before
the shared ``out_proj``. This variant has no mamba_ssm counterpart.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from umamba import fast_paths
from umamba.mamba import conv_cpu
from umamba.mamba.scan import BACKENDS, resolve_backend, selective_scan


def _project(weight, x):
    """``weight`` (out, in) applied to channel-first ``x`` (b, in, l) -> (b, out, l): a 1x1 convolution.

    No operand is copied (``torch.matmul`` of a matrix by a batch transposes and copies them).
    On the CPU, oneDNN's 1x1 convolution is 25-30 % faster than ``bmm`` (MKL) for in_proj and
    out_proj of the default model (128 -> 512 and 256 -> 128 channels, 8000 frames, 2 threads).
    """
    return F.conv1d(x, weight.unsqueeze(-1))


def _at_least_fp32(t):
    """The SSM parameters run in float32 (as in mamba_ssm), or float64 when the module is double."""
    return t if t.dtype == torch.float64 else t.float()


class Mamba(nn.Module):
    """Mamba block: input and output (batch, length, d_model).

    Arguments
    ---------
    d_model : int
        Feature width of input and output.
    d_state : int
        SSM state size per channel (``N``).
    d_conv : int
        Kernel size of the causal depthwise convolution.
    expand : int
        ``d_inner = expand * d_model``.
    dt_rank : int or "auto"
        Rank of the step-size projection; ``ceil(d_model / 16)`` for "auto".
    dt_min, dt_max : float
        Range of the initial step sizes (log-uniform).
    dt_init : str
        "random" or "constant" initialisation of ``dt_proj.weight``.
    dt_scale : float
        Scale of the ``dt_proj.weight`` initialisation.
    dt_init_floor : float
        Lower bound of the initial step sizes.
    conv_bias : bool
        Bias in the depthwise convolution.
    bias : bool
        Bias in ``in_proj`` and ``out_proj``.
    bidirectional : bool
        Also scan the time-reversed sequence (extra ``*_b`` parameters).
    backend : str
        Selective-scan backend: "auto", "cuda", "cpu" or "torch" (see :mod:`umamba.mamba.scan`).
    layer_idx : int, optional
        Kept for mamba_ssm compatibility; unused.
    device, dtype
        Factory arguments for the parameters.

    Example
    -------
    >>> block = Mamba(d_model=16, d_state=4, backend="torch")
    >>> block(torch.randn(2, 10, 16)).shape
    torch.Size([2, 10, 16])
    """

    def __init__(
        self,
        d_model,
        d_state=16,
        d_conv=4,
        expand=2,
        dt_rank="auto",
        dt_min=0.001,
        dt_max=0.1,
        dt_init="random",
        dt_scale=1.0,
        dt_init_floor=1e-4,
        conv_bias=True,
        bias=False,
        bidirectional=False,
        backend="auto",
        layer_idx=None,
        device=None,
        dtype=None,
    ):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"Unknown scan backend {backend!r}; choose one of {BACKENDS}")
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.bidirectional = bidirectional
        self.backend = backend
        self.layer_idx = layer_idx

        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias, **factory_kwargs)
        directions = [""] + (["_b"] if bidirectional else [])
        for sfx in directions:
            self.add_module(
                "conv1d" + sfx,
                nn.Conv1d(
                    self.d_inner,
                    self.d_inner,
                    kernel_size=d_conv,
                    groups=self.d_inner,
                    padding=d_conv - 1,
                    bias=conv_bias,
                    **factory_kwargs,
                ),
            )
            self.add_module(
                "x_proj" + sfx,
                nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory_kwargs),
            )
            dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory_kwargs)
            self._init_dt_proj(dt_proj, dt_init, dt_scale, dt_min, dt_max, dt_init_floor)
            self.add_module("dt_proj" + sfx, dt_proj)
            # S4D-real initialisation: A[d, n] = -(n + 1), stored as log, kept in float32.
            A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
            A_log = nn.Parameter(torch.log(A))
            A_log._no_weight_decay = True
            D = nn.Parameter(torch.ones(self.d_inner, device=device))
            D._no_weight_decay = True
            # mamba_ssm names the backward set A_b_log / D_b (Vision Mamba convention).
            self.register_parameter("A_log" if not sfx else "A_b_log", A_log)
            self.register_parameter("D" + sfx, D)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory_kwargs)

    @staticmethod
    def _init_dt_proj(dt_proj, dt_init, dt_scale, dt_min, dt_max, dt_init_floor):
        """mamba_ssm's initialisation: weight preserves variance, softplus(bias) in [dt_min, dt_max]."""
        dt_init_std = dt_proj.in_features**-0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(dt_proj.weight, dt_init_std)
        elif dt_init == "random":
            nn.init.uniform_(dt_proj.weight, -dt_init_std, dt_init_std)
        else:
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        d_inner = dt_proj.out_features
        dt = torch.exp(
            torch.rand(d_inner, device=dt_proj.bias.device) * (math.log(dt_max) - math.log(dt_min))
            + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        inv_dt = dt + torch.log(-torch.expm1(-dt))  # inverse of softplus
        with torch.no_grad():
            dt_proj.bias.copy_(inv_dt)
        dt_proj.bias._no_reinit = True

    def _ssm(self, x, z, conv1d, x_proj, dt_proj, A_log, D):
        """One direction: x, z (b, e, l) -> gated SSM output (b, e, l)."""
        if conv_cpu.applies(conv1d, x):  # CPU inference: one fused pass
            x = conv_cpu.causal_conv1d_silu(x, conv1d.weight, conv1d.bias)
        else:
            x = F.silu(conv1d(x)[..., : x.shape[-1]])  # causal: keep the first l outputs
        x_dbl = _project(x_proj.weight, x)  # (b, r + 2n, l): x_proj, channel-first
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=1)
        # CPU inference: the numba scan applies dt_proj itself while it loads dt (b, r, l), instead
        # of a 1x1 convolution writing a (b, e, l) tensor for it to read back. The module runs
        # as such inside fast_paths.module_path() and when it has hooks.
        fold_dt_proj = fast_paths.may_stand_in(
            x, [self, x_proj, dt_proj], dtypes=(torch.float32, torch.float64)
        ) and resolve_backend(self.backend, x.device) == "cpu"
        if not fold_dt_proj:
            dt = _project(dt_proj.weight, dt)  # (b, e, l); its bias goes to the scan
        A = -torch.exp(_at_least_fp32(A_log))  # (e, n)
        return selective_scan(
            x,
            dt,  # (b, e, l), or (b, r, l) with delta_proj
            A,
            B,  # (b, n, l)
            C,
            _at_least_fp32(D),
            z=z,
            delta_bias=_at_least_fp32(dt_proj.bias),
            delta_softplus=True,
            backend=self.backend,
            delta_proj=dt_proj.weight if fold_dt_proj else None,  # (e, r)
        )

    def forward(self, hidden_states, channels_first=False):
        """(batch, length, d_model) -> (batch, length, d_model).

        With ``channels_first=True``: (batch, d_model, length) -> (batch, d_model, length), the
        layout of convolutional networks, with no transpose at all. Every projection is then an
        (out, in) @ (b, in, l) product, so the tensors the scan reads are contiguous (mamba_ssm
        computes ``xz`` the same way).
        """
        x_bdl = hidden_states if channels_first else hidden_states.transpose(1, 2)
        xz = _project(self.in_proj.weight, x_bdl)  # (b, 2e, l)
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias[:, None]
        x, z = xz.chunk(2, dim=1)
        y = self._ssm(x, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        if self.bidirectional:
            y_b = self._ssm(
                x.flip(-1), z.flip(-1), self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b
            )
            y = 0.5 * (y + y_b.flip(-1))
        out = _project(self.out_proj.weight, y)  # (b, d, l)
        if self.out_proj.bias is not None:
            out = out + self.out_proj.bias[:, None]
        return out if channels_first else out.transpose(1, 2)

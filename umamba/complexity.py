"""Parameters, multiply-accumulates (MACs) and CPU time of a separator defined by a recipe yaml.

Works for any yaml that defines ``Encoder``, ``MaskNet`` and ``Decoder`` (SpeechBrain's
separation triplet): U-Mamba-Net, SuDoRM-RF, SepFormer, DPRNN, Conv-TasNet.

Usage::

    python -m umamba.complexity hparams/umamba.yaml [--seconds 10] [--threads 2] [--key value ...]

MACs are counted during one real forward pass by hooks on the layers that do the arithmetic:
convolutions, transposed convolutions, linear layers, LSTM/GRU/RNN, multi-head attention
(projections and the two attention products) and the Mamba block: its projections and the
selective scan itself (3 MACs per batch x length x d_inner x d_state and direction: decay, input
and read-out).
Norms, activations and element-wise products are not counted (as in the papers' GMAC figures).
"""

import argparse
import dataclasses
import math
import sys
import tempfile
import time

import torch
import torch.nn as nn
import yaml
from hyperpyyaml import load_hyperpyyaml

from umamba.allocator import keep_freed_memory
from umamba.fast_paths import module_path
from umamba.mamba import Mamba
from umamba.models.separator import Separator

TRIPLET = ("Encoder", "MaskNet", "Decoder")


def _rnn_macs(module, inputs, output):
    x = inputs[0]
    steps_times_batch = x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]
    gates = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}[type(module)]
    directions = 2 if module.bidirectional else 1
    total, in_size = 0, module.input_size
    for _ in range(module.num_layers):
        total += steps_times_batch * directions * gates * module.hidden_size * (in_size + module.hidden_size)
        in_size = module.hidden_size * directions
    return total


def _mha_macs(module, inputs, output):
    q, k = inputs[0], inputs[1]
    if not module.batch_first and q.dim() == 3:
        q, k = q.transpose(0, 1), k.transpose(0, 1)
    batch, lq, e = q.shape if q.dim() == 3 else (1, *q.shape)
    lk = k.shape[-2]
    projections = batch * (lq * e * e + 2 * lk * e * e + lq * e * e)  # q, k, v in; out
    attention = 2 * batch * lq * lk * e  # Q K^T and A V
    return projections + attention


def _mamba_macs(module, inputs, output):
    """Mamba's projections (applied as matrix products, so no Linear hook sees them) and its scan."""
    frames = inputs[0].numel() // module.d_model  # either layout: (b, l, d) or channels-first (b, d, l)
    e, d, n, r = module.d_inner, module.d_model, module.d_state, module.dt_rank
    directions = 2 if module.bidirectional else 1
    shared = frames * d * 2 * e + frames * e * d  # in_proj, out_proj
    per_direction = frames * e * (r + 2 * n) + frames * r * e + 3 * frames * e * n  # x_proj, dt_proj, scan
    return shared + directions * per_direction


def _layer_macs(module, inputs, output):
    """MACs of one call of ``module``, or None for layers that are not counted."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, nn.ConvTranspose1d):
        return inputs[0].numel() * (module.out_channels // module.groups) * module.kernel_size[0]
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    if isinstance(module, (nn.LSTM, nn.GRU, nn.RNN)):
        return _rnn_macs(module, inputs, output)
    if isinstance(module, nn.MultiheadAttention):
        return _mha_macs(module, inputs, output)
    if isinstance(module, Mamba):
        return _mamba_macs(module, inputs, output)  # its conv1d counts itself
    return None


def count_macs(model: nn.Module, *inputs) -> int:
    """MACs of one forward pass of ``model`` on ``inputs`` (see the module docstring for what counts).

    Example
    -------
    >>> count_macs(nn.Linear(4, 3, bias=False), torch.randn(5, 4))
    60
    """
    total = 0

    def hook(module, args, output):
        nonlocal total
        macs = _layer_macs(module, args, output)
        if macs is not None:
            total += int(macs)

    # nn.MultiheadAttention calls its out_proj functionally; count it only through the MHA hook.
    skip = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    handles = [m.register_forward_hook(hook) for m in model.modules() if id(m) not in skip]
    try:
        with torch.no_grad(), module_path():  # fused CPU kernels would bypass the conv hooks
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return total


def load_separator(hparams_file: str, overrides: dict | None = None) -> tuple[Separator, int]:
    """Instantiate the Encoder/MaskNet/Decoder of a recipe yaml (nothing is written to disk).

    Returns the separator (in eval mode) and the yaml's ``sample_rate`` (8000 if absent).
    """
    with open(hparams_file, encoding="utf-8") as f, tempfile.TemporaryDirectory() as tmp:
        hparams = load_hyperpyyaml(f, {"output_folder": tmp, **(overrides or {})})
    missing = [k for k in TRIPLET if k not in hparams]
    if missing:
        raise KeyError(f"{hparams_file} defines no {', '.join(missing)} (a separator yaml needs {TRIPLET})")
    return Separator(*(hparams[k] for k in TRIPLET)).eval(), hparams.get("sample_rate", 8000)


@dataclasses.dataclass
class Complexity:
    """What :func:`measure` reports."""

    params: int
    params_by_module: dict
    gmac_per_second: float
    seconds: float
    cpu_time: float
    threads: int

    @property
    def real_time_factor(self) -> float:
        return self.cpu_time / self.seconds


def best_time(fn, repeats: int = 1) -> float:
    """The fastest of ``repeats`` timed calls of ``fn()``, in seconds (the least disturbed by other load).

    Example
    -------
    >>> best_time(lambda: sum(range(10)), repeats=3) < 1.0
    True
    """
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(separator: nn.Module, sample_rate: int, seconds: float = 10.0, threads: int | None = None, repeats=1):
    """Count parameters and MACs and time CPU inference of ``separator`` on ``seconds`` of audio.

    Example
    -------
    >>> sep = nn.Sequential(nn.Unflatten(1, (1, -1)), nn.Conv1d(1, 4, 3))
    >>> report = measure(sep, sample_rate=8000, seconds=0.5)
    >>> report.params, report.gmac_per_second
    (16, 9.5952e-05)
    """
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        mix = torch.randn(1, int(seconds * sample_rate))
        macs = count_macs(separator, mix)
        with torch.no_grad():
            separator(mix[:, : sample_rate // 2])  # warm-up (kernel compilation, allocator)
            best = best_time(lambda: separator(mix), repeats)
        by_module = {
            name: sum(p.numel() for p in child.parameters()) for name, child in separator.named_children()
        }
        return Complexity(
            params=sum(p.numel() for p in separator.parameters()),
            params_by_module=by_module,
            gmac_per_second=macs / seconds / 1e9,
            seconds=seconds,
            cpu_time=best,
            threads=torch.get_num_threads(),
        )
    finally:
        torch.set_num_threads(previous)


def _parse_overrides(pairs):
    """``["--key", "value", ...]`` -> ``{"key": yaml value}``, as SpeechBrain's command lines."""
    if len(pairs) % 2:
        raise SystemExit(f"overrides come in pairs (--key value), got {pairs}")
    return {k.lstrip("-"): yaml.safe_load(v) for k, v in zip(pairs[::2], pairs[1::2])}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hparams", help="recipe yaml with Encoder, MaskNet and Decoder")
    parser.add_argument("--seconds", type=float, default=10.0, help="audio length to time (default 10)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs; the fastest is reported")
    args, rest = parser.parse_known_args(argv)
    overrides = _parse_overrides(rest)
    keep_freed_memory()  # time the model as umamba-separate runs it
    separator, sample_rate = load_separator(args.hparams, overrides)
    r = measure(separator, sample_rate, args.seconds, args.threads, args.repeats)
    print(f"model        {args.hparams}")
    print(f"parameters   {r.params / 1e6:.3f} M  ({', '.join(f'{k} {v / 1e6:.3f} M' for k, v in r.params_by_module.items())})")
    print(f"compute      {r.gmac_per_second:.3f} GMAC per second of {sample_rate} Hz audio")
    print(f"CPU time     {r.cpu_time:.3f} s for {r.seconds:g} s of audio on {r.threads} threads (real-time factor {r.real_time_factor:.3f})")
    return r


if __name__ == "__main__":
    main(sys.argv[1:])

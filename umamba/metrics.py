"""Separation metrics of one utterance: SI-SNR(i), SDR(i)/SIR/SAR, PESQ and STOI.

Conventions
-----------
The low-level functions (``si_snr``, ``best_permutation``, ``sdr_sir_sar``, ``pesq_score``,
``stoi_score``) take signals with time on the last dimension, sources stacked as ``[n_src, T]``.
``prepare_utterance`` and ``evaluate_utterance`` take SpeechBrain's layout: the mixture ``[T]``
and the sources ``[T, n_src]``, as a separation Brain holds them at test time.

The training loss is SpeechBrain's ``get_si_snr_with_pitwrapper``; this module only evaluates.

Authors
 * U-Mamba-Net contributors
"""

import itertools
import math
import warnings

import fast_bss_eval
import numpy as np
import torch
from pesq import BufferTooShortError, NoUtterancesError, pesq
from pystoi import stoi
from scipy.signal import resample_poly

PESQ_SAMPLE_RATE = {8000: "nb", 16000: "wb"}
"""PESQ mode for each rate the pesq package accepts; other rates are resampled to 16 kHz (wb)."""

_STOI_TOO_SHORT = "Not enough STFT frames"  # start of pystoi's warning before it returns 1e-5


def si_snr(est: torch.Tensor, ref: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale-invariant signal-to-noise ratio in dB along the last dimension.

    Both signals are made zero-mean, then ``s_target = <est, ref> ref / |ref|^2`` and
    ``SI-SNR = 10 log10(|s_target|^2 / |est - s_target|^2)``.

    Arguments
    ---------
    est : torch.Tensor
        Estimated signals ``[..., T]``.
    ref : torch.Tensor
        Reference signals ``[..., T]``, broadcastable with ``est``.
    eps : float
        Guards the divisions and the logarithm (as in SpeechBrain's ``cal_si_snr``).

    Returns
    -------
    torch.Tensor
        SI-SNR in dB, the broadcast shape of ``est`` and ``ref`` without the last dimension.

    Example
    -------
    >>> ref = torch.tensor([1.0, -1.0, 1.0, -1.0])
    >>> noise = torch.tensor([1.0, 1.0, -1.0, -1.0])  # orthogonal to ref, same energy
    >>> round(si_snr(3.0 * (ref + noise) + 0.5, ref).item(), 4)  # scale and offset do not matter
    0.0
    """
    if est.shape[-1] != ref.shape[-1]:
        raise ValueError(
            f"si_snr: est and ref must have the same length (last dimension), "
            f"got {tuple(est.shape)} and {tuple(ref.shape)}"
        )
    est = est - est.mean(dim=-1, keepdim=True)
    ref = ref - ref.mean(dim=-1, keepdim=True)
    dot = (est * ref).sum(dim=-1, keepdim=True)
    s_target = dot * ref / ((ref**2).sum(dim=-1, keepdim=True) + eps)
    e_noise = est - s_target
    ratio = (s_target**2).sum(dim=-1) / ((e_noise**2).sum(dim=-1) + eps)
    return 10 * torch.log10(ratio + eps)


def best_permutation(est: torch.Tensor, ref: torch.Tensor) -> tuple[int, ...]:
    """Order of the estimates that maximises the mean SI-SNR (search over all n_src! orders).

    Arguments
    ---------
    est : torch.Tensor
        Estimated sources ``[n_src, T]``.
    ref : torch.Tensor
        Reference sources ``[n_src, T]``.

    Returns
    -------
    tuple of int
        ``perm`` such that ``est[list(perm)]`` is aligned with ``ref``
        (``est[perm[i]]`` estimates ``ref[i]``).

    Example
    -------
    >>> ref = torch.randn(2, 1000)
    >>> best_permutation(ref.flip(0), ref)
    (1, 0)
    """
    if est.dim() != 2 or est.shape != ref.shape:
        raise ValueError(
            f"best_permutation: est and ref must both be [n_src, T], "
            f"got {tuple(est.shape)} and {tuple(ref.shape)}"
        )
    # pairwise[i, j] = SI-SNR of estimate j against reference i
    pairwise = si_snr(est.unsqueeze(0), ref.unsqueeze(1))
    n_src = est.shape[0]
    return max(
        itertools.permutations(range(n_src)),
        key=lambda perm: pairwise[range(n_src), list(perm)].sum().item(),
    )


def sdr_sir_sar(
    est: torch.Tensor, ref: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BSS-eval SDR, SIR and SAR in dB of each source, by ``fast_bss_eval``.

    Distortion filters of 512 taps over the whole signal (the values of
    ``mir_eval.separation.bss_eval_sources``). No permutation is searched: align ``est`` with
    :func:`best_permutation` first. Computed on the CPU in float64 with the torch backend (the
    numpy backend of fast_bss_eval 0.1.4 fails with numpy 2), on one thread.

    Arguments
    ---------
    est : torch.Tensor
        Estimated sources ``[n_src, T]``, aligned with ``ref``.
    ref : torch.Tensor
        Reference sources ``[n_src, T]``.

    Returns
    -------
    sdr, sir, sar : torch.Tensor
        Each ``[n_src]``, float64; all NaN when BSS-eval is undefined because the references are
        linearly dependent (e.g. a silent reference).

    Example
    -------
    >>> ref = torch.randn(2, 4000, dtype=torch.float64)
    >>> sdr, sir, sar = sdr_sir_sar(ref + 0.01 * ref.flip(0), ref)
    >>> bool((sir > 35).all() and (sar > 100).all())
    True
    """
    if est.dim() != 2 or est.shape != ref.shape:
        raise ValueError(
            f"sdr_sir_sar: est and ref must both be [n_src, T], "
            f"got {tuple(est.shape)} and {tuple(ref.shape)}"
        )
    # Batched torch.linalg.solve on the CPU fails with more than one thread (MKL "Pivots given
    # to lu_solve must all be greater or equal to 1", pytorch/pytorch#142815): solve on one.
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sdr, sir, sar = fast_bss_eval.bss_eval_sources(
            ref.detach().cpu().double(),
            est.detach().cpu().double(),
            compute_permutation=False,
        )
    except torch.linalg.LinAlgError:  # the references (with their 512-tap delays) are dependent
        sdr = sir = sar = torch.full((ref.shape[0],), math.nan, dtype=torch.float64)
    finally:
        torch.set_num_threads(num_threads)
    return sdr, sir, sar


def pesq_score(est: torch.Tensor, ref: torch.Tensor, sample_rate: int) -> float:
    """PESQ (ITU-T P.862) of one estimate against its reference.

    Narrow-band mode at 8 kHz, wide-band mode at 16 kHz; signals at any other rate are
    resampled to 16 kHz and scored wide-band.

    Arguments
    ---------
    est : torch.Tensor
        Estimated signal ``[T]``.
    ref : torch.Tensor
        Reference signal ``[T]``.
    sample_rate : int
        Sampling rate of both signals in Hz.

    Returns
    -------
    float
        MOS-LQO score, or ``math.nan`` when PESQ is undefined: no speech detected in the
        reference (e.g. silence) or a signal shorter than 1/4 s.

    Example
    -------
    >>> pesq_score(torch.randn(8000), torch.zeros(8000), 8000)
    nan
    """
    est_np, ref_np = _to_numpy(est), _to_numpy(ref)
    if sample_rate not in PESQ_SAMPLE_RATE:
        est_np = resample_poly(est_np, 16000, sample_rate)
        ref_np = resample_poly(ref_np, 16000, sample_rate)
        sample_rate = 16000
    try:
        # pesq divides both signals by their joint peak: 0/0 for two silent signals
        with np.errstate(invalid="ignore", divide="ignore"):
            return float(pesq(sample_rate, ref_np, est_np, PESQ_SAMPLE_RATE[sample_rate]))
    except (NoUtterancesError, BufferTooShortError):
        return math.nan


def stoi_score(est: torch.Tensor, ref: torch.Tensor, sample_rate: int) -> float:
    """STOI (short-time objective intelligibility, not the extended one) by pystoi.

    Arguments
    ---------
    est : torch.Tensor
        Estimated signal ``[T]``.
    ref : torch.Tensor
        Reference signal ``[T]``.
    sample_rate : int
        Sampling rate of both signals in Hz.

    Returns
    -------
    float
        Score in [0, 1] (higher is better), or ``math.nan`` when fewer than 30 non-silent
        frames of the reference remain (pystoi would return a placeholder 1e-5).

    Example
    -------
    >>> ref = torch.randn(16000)
    >>> 0.99 < stoi_score(ref, ref, 16000) <= 1.0
    True
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        score = stoi(_to_numpy(ref), _to_numpy(est), sample_rate, extended=False)
    if any(str(w.message).startswith(_STOI_TOO_SHORT) for w in caught):
        return math.nan
    return float(score)


def prepare_utterance(
    mix: torch.Tensor, est: torch.Tensor, ref: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checks one utterance in SpeechBrain's layout and returns it source-major in float64.

    Arguments
    ---------
    mix : torch.Tensor
        Mixture ``[T]``.
    est : torch.Tensor
        Estimated sources ``[T, n_src]``.
    ref : torch.Tensor
        Reference sources ``[T, n_src]``.

    Returns
    -------
    mix, est, ref : torch.Tensor
        ``[T]``, ``[n_src, T]`` and ``[n_src, T]``, float64 on the CPU.

    Raises
    ------
    ValueError
        If the shapes disagree or a signal holds NaN or infinite values.

    Example
    -------
    >>> sources = torch.zeros(100, 2)
    >>> mix, est, ref = prepare_utterance(sources.sum(1), sources, sources)
    >>> est.shape, est.dtype
    (torch.Size([2, 100]), torch.float64)
    """
    if mix.dim() != 1 or est.dim() != 2 or est.shape != ref.shape or est.shape[0] != mix.shape[0]:
        raise ValueError(
            f"Expected mix [T], est [T, n_src] and ref [T, n_src] with the same T, got "
            f"mix {tuple(mix.shape)}, est {tuple(est.shape)}, ref {tuple(ref.shape)}"
        )
    for name, signal in (("mix", mix), ("est", est), ("ref", ref)):
        n_bad = (~torch.isfinite(signal)).sum().item()
        if n_bad:
            raise ValueError(
                f"{name} holds {n_bad} NaN or infinite sample(s) of {signal.numel()}: "
                f"cannot compute separation metrics"
            )
    mix, est, ref = (signal.detach().cpu().double() for signal in (mix, est, ref))
    return mix, est.T, ref.T


def evaluate_utterance(
    mix: torch.Tensor,
    est: torch.Tensor,
    ref: torch.Tensor,
    sample_rate: int,
    compute_pesq: bool = True,
    compute_stoi: bool = True,
) -> dict:
    """All metrics of one separated utterance, averaged over its sources.

    The estimates are first put in the order that maximises the mean SI-SNR. Improvements
    (``si_snri``, ``sdri``) are relative to the mixture used as the estimate of every source.

    Arguments
    ---------
    mix : torch.Tensor
        Mixture ``[T]``.
    est : torch.Tensor
        Estimated sources ``[T, n_src]``.
    ref : torch.Tensor
        Reference sources ``[T, n_src]``.
    sample_rate : int
        Sampling rate in Hz.
    compute_pesq : bool
        Adds ``pesq`` and ``pesq_mix`` (NaN when PESQ is undefined for a source).
    compute_stoi : bool
        Adds ``stoi`` and ``stoi_mix``.

    Returns
    -------
    dict
        Floats ``si_snr``, ``si_snri``, ``sdr``, ``sdri``, ``sir``, ``sar`` (dB), then
        ``pesq``, ``pesq_mix``, ``stoi``, ``stoi_mix`` when asked, and ``permutation``
        (tuple of int, as returned by :func:`best_permutation`).

    Example
    -------
    >>> ref = torch.randn(8000, 2)
    >>> mix = ref.sum(dim=1)
    >>> est = ref.flip(1) + 0.01 * torch.randn(8000, 2)
    >>> m = evaluate_utterance(mix, est, ref, 8000, compute_pesq=False, compute_stoi=False)
    >>> m["permutation"], m["si_snr"] > 35, m["si_snri"] > 35
    ((1, 0), True, True)
    """
    mix, est, ref = prepare_utterance(mix, est, ref)
    perm = best_permutation(est, ref)
    est = est[list(perm)]
    mix = mix.expand_as(ref)
    sisnr, sisnr_mix = si_snr(est, ref), si_snr(mix, ref)
    sdr, sir, sar = sdr_sir_sar(est, ref)
    sdr_mix = sdr_sir_sar(mix, ref)[0]
    if (ref == ref[:, :1]).all(dim=1).any():
        # SI-SNR against a constant (silent) reference is only the eps term (about -80 dB):
        # undefined like SDR, so NaN (counted as failed in the report), not a number in the means.
        sisnr = sisnr_mix = torch.full_like(sisnr, math.nan)
    metrics = {
        "si_snr": sisnr.mean().item(),
        "si_snri": (sisnr - sisnr_mix).mean().item(),
        "sdr": sdr.mean().item(),
        "sdri": (sdr - sdr_mix).mean().item(),
        "sir": sir.mean().item(),
        "sar": sar.mean().item(),
    }
    scorers = {"pesq": (compute_pesq, pesq_score), "stoi": (compute_stoi, stoi_score)}
    for name, (wanted, scorer) in scorers.items():
        if wanted:
            # a source that cannot be scored (NaN) makes the utterance's mean NaN
            metrics[name] = float(np.mean([scorer(e, r, sample_rate) for e, r in zip(est, ref)]))
            metrics[f"{name}_mix"] = float(
                np.mean([scorer(m, r, sample_rate) for m, r in zip(mix, ref)])
            )
    metrics["permutation"] = perm
    return metrics


def _to_numpy(signal: torch.Tensor) -> np.ndarray:
    """A 1-D float64 numpy copy of a tensor (or array-like), for the numpy-only scorers."""
    return torch.as_tensor(signal).detach().cpu().double().numpy()

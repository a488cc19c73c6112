"""Mamba block and selective-scan backends (mamba_ssm-compatible parameters)."""

from umamba.mamba.block import Mamba
from umamba.mamba.scan import resolve_backend, selective_scan, selective_scan_torch

__all__ = ["Mamba", "resolve_backend", "selective_scan", "selective_scan_torch"]

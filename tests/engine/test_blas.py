"""The decode step's cuBLAS preference and product tuning are set inside and restored after,
errors included."""

import pytest
import torch

from engine import blas
from kernels import cublaslt


def test_decode_blas_sets_the_preference_inside_and_restores_it(monkeypatch):
    state = {"library": "cublas"}
    calls = []

    def preferred_blas_library(backend=None):
        if backend is not None:
            calls.append(backend)
            state["library"] = backend
        return state["library"]

    monkeypatch.setattr(torch.backends.cuda, "preferred_blas_library", preferred_blas_library)
    library = "cublas" if blas.DECODE_BLAS == "cublas" else "cublaslt"
    with blas.decode_blas(torch.device("cuda")):
        assert state["library"] == library
        assert cublaslt._tuning == (blas.DECODE_BLAS == "tuned")
    assert state["library"] == "cublas" and not cublaslt._tuning
    with pytest.raises(RuntimeError, match="step failed"):
        with blas.decode_blas(torch.device("cuda")):
            raise RuntimeError("step failed")
    assert state["library"] == "cublas" and not cublaslt._tuning
    assert calls == [library, "cublas"] * 2


def test_decode_blas_leaves_cpu_runs_alone(monkeypatch):
    def fail(backend=None):
        raise AssertionError("touched the cuBLAS preference on a CPU run")

    monkeypatch.setattr(torch.backends.cuda, "preferred_blas_library", fail)
    with blas.decode_blas(torch.device("cpu")):
        pass

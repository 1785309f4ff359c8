"""``python -m graphopt explain``: its arguments, and one step of a bf16 model on the CPU."""

from __future__ import annotations

import pytest
import torch

from graphopt.__main__ import build_parser, main


def test_explain_defaults_to_an_fp32_model_on_the_cpu():
    args = build_parser().parse_args(["explain"])
    assert (args.device, args.dtype, args.family, args.layout) == ("cpu", "float32", "llama", "right")


def test_explain_takes_a_device_and_a_dtype():
    args = build_parser().parse_args(["explain", "--device", "cuda:1", "--dtype", "bfloat16"])
    assert (args.device, args.dtype) == ("cuda:1", "bfloat16")


def test_explain_rejects_an_unknown_dtype(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["explain", "--dtype", "int8"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.slow
def test_explain_runs_a_bf16_step_on_the_cpu(capsys):
    assert main(["explain", "--dtype", "bfloat16", "--seq", "16"]) == 0
    out, err = capsys.readouterr()
    assert "llama (cpu, bfloat16)" in err
    assert "mask_elision x2" in out and "fast_path=1" in out and "right_padding" in out  # the guard


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message for a machine without CUDA")
def test_explain_on_cuda_without_cuda_says_so(capsys):
    with pytest.raises(SystemExit):
        main(["explain", "--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err

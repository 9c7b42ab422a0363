"""``slipstream bench embed`` end to end on CPU (tiny Qwen3), and the bench dispatcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slipstream.cli import main

REPO = Path(__file__).resolve().parents[1]

REQUIRED_KEYS = {
    "items_per_s",
    "tokens_per_s",
    "mfu",
    "baseline_items_per_s",
    "baseline_tokens_per_s",
    "baseline_batch_size",
    "baseline_results",
    "speedup",
    "cosine_min",
    "device",
    "device_name",
    "dtype",
    "quantization",
    "workload",
    "items",
    "total_tokens",
    "total_flops",
    "peak_tflops_measured",
    "seconds",
    "baseline_seconds",
    "torch_version",
    "command",
    "time_breakdown",
}
STAGES = {"schedule_pack", "host_to_device", "forward", "pool_postprocess", "device_to_host"}


def test_bench_embed_cli_against_hf(tiny_qwen3: Path, tmp_path: Path) -> None:
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    cmd = [
        sys.executable,
        "-m",
        "slipstream",
        "bench",
        "embed",
        "--model",
        str(tiny_qwen3),
        "--workload",
        "short",
        "--items",
        "16",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--baseline",
        "hf",
        "--json",
        str(out),
        "--plot",
        str(png),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "speedup" in proc.stdout
    res = json.loads(out.read_text())
    assert REQUIRED_KEYS <= res.keys()
    assert res["device"] == "cpu" and res["dtype"] == "float32"
    assert res["workload"] == "short" and res["items"] == 16
    assert res["cosine_min"] > 0.9999
    assert {r["batch_size"] for r in res["baseline_results"]} == {8, 32}
    assert all(r["cosine_min"] > 0.9999 for r in res["baseline_results"])
    assert res["baseline_batch_size"] in (8, 32)
    assert res["speedup"] == pytest.approx(res["items_per_s"] / res["baseline_items_per_s"])
    assert res["tokens_per_s"] == pytest.approx(res["total_tokens"] / res["seconds"])
    assert res["peak_tflops_measured"] > 0 and 0 < res["mfu"]
    assert STAGES <= res["time_breakdown"]["stages_ms"].keys()
    assert res["command"].startswith("slipstream bench embed")
    assert png.is_file() and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_embed_without_baseline(
    tiny_qwen3: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, lens = tmp_path / "out.json", tmp_path / "lens.json"
    lens.write_text(json.dumps([100, 16, 9]))  # capped at --max-input-tokens
    rc = main(
        [
            "bench",
            "embed",
            "--model",
            str(tiny_qwen3),
            "--workload",
            str(lens),
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--baseline",
            "none",
            "--repeats",
            "1",
            "--peak-tflops",
            "1.5",
            "--max-input-tokens",
            "64",
            "--no-breakdown",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["baseline_results"] == [] and res["speedup"] is None
    assert res["baseline_items_per_s"] is None and res["cosine_min"] is None
    assert res["peak_tflops"] == 1.5 and res["peak_tflops_measured"] is None
    assert res["items"] == 3 and res["total_tokens"] == 64 + 16 + 9
    assert res["capped_items"] == 1 and "capped" in res["note"]
    assert res["time_breakdown"] is None
    assert "1 capped at 64" in capsys.readouterr().out


def test_bench_generate_missing_is_clear(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    if importlib.util.find_spec("slipstream.bench.generate_bench") is not None:
        pytest.skip("generate_bench exists in this checkout")
    rc = main(["bench", "generate", "--model", "x", "--steps", "3"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "generate" in err and "not in this checkout" in err


def test_bench_generate_is_registered_when_present() -> None:
    import importlib.util

    if importlib.util.find_spec("slipstream.bench.generate_bench") is None:
        pytest.skip("generate_bench is not in this checkout")
    with pytest.raises(SystemExit) as exc:
        main(["bench", "generate", "--help"])
    assert exc.value.code == 0


def test_bench_without_subcommand_fails_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench"]) == 2
    assert "embed" in capsys.readouterr().err


@pytest.mark.gpu
def test_bench_embed_gpu_smoke(tmp_path: Path) -> None:
    from slipstream.checkpoint import make_checkpoint

    ckpt = make_checkpoint("qwen3-tiny", tmp_path / "tiny-bf16", seed=0, dtype="bfloat16")
    out = tmp_path / "gpu.json"
    rc = main(
        [
            "bench",
            "embed",
            "--model",
            str(ckpt),
            "--workload",
            "mixed",
            "--items",
            "64",
            "--device",
            "cuda",
            "--baseline",
            "hf",
            "--repeats",
            "2",
            "--json",
            str(out),
            "--plot",
            str(tmp_path / "gpu.png"),
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["device"] == "cuda" and res["dtype"] == "bfloat16"
    assert res["peak_tflops_measured"] > 10
    assert res["cosine_min"] > 0.99
    assert (tmp_path / "gpu.png").is_file()


def test_baseline_is_warmed_up_with_a_full_pass_per_batch_size(
    qwen3_engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The baseline gets the warm-up slipstream gets: one full pass of the workload at each
    batch size before its timed passes (a partial warm-up leaves shape warm-up in the first
    timed pass, which made the baseline look slower)."""
    from slipstream.bench import baseline_hf, embed_bench
    from slipstream.bench.workloads import make_workload

    wl = make_workload("short", 20, qwen3_engine.model_config.vocab_size)
    calls: list[tuple[int, int]] = []  # (batch size, rows) of every baseline forward
    real_forward = baseline_hf.HFBaseline.forward

    def counting_forward(self, batch, normalize=True):  # type: ignore[no-untyped-def]
        calls.append((self._bs, len(batch)))
        return real_forward(self, batch, normalize)

    real_batches = baseline_hf.HFBaseline.batches

    def tagging_batches(self, seqs, batch_size):  # type: ignore[no-untyped-def]
        self._bs = batch_size
        return real_batches(self, seqs, batch_size)

    monkeypatch.setattr(baseline_hf.HFBaseline, "forward", counting_forward)
    monkeypatch.setattr(baseline_hf.HFBaseline, "batches", tagging_batches)
    results, _ = embed_bench.run_baseline(qwen3_engine, wl, None, [8, 32], 2, 1, 1.0)
    assert [r["batch_size"] for r in results] == [8, 32]
    for bs in (8, 32):
        rows = [n for b, n in calls if b == bs]
        # warm-up + 2 timed passes, each over all 20 items
        assert sum(rows) == 3 * 20, (bs, rows)
        assert len(results[0]["seconds_runs"]) == 2

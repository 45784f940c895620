"""benchmarks/attention_choice.py at toy sizes: the rows it promises exist for the precisions
asked (and only those), and `auto` picks the kernel docs/ort_lowering.md says it picks at a
GPT-2-style decode site: opset-23 Attention for fp32, GroupQueryAttention (its cache shared) for
8-bit weight-only. Speed is not asserted (toy sizes, no claims)."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "attention_choice.py"


def test_the_int8_rows_and_the_kernel_auto_picks(tmp_path):
    out = tmp_path / "choice.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--threads", "1", "--precisions", "int8",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert "fp32" not in result and "int4" not in result
    int8 = result["int8"]
    assert set(int8["auto_picks"]) == {"com.microsoft.GroupQueryAttention"}
    assert set(int8["timing"]) == {"onnx-growing", "gqa-growing", "gqa-shared"}
    assert all(row["p50_ms"] > 0 for row in int8["timing"].values())


def test_an_unknown_precision_is_refused_before_any_work(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--precisions", "fp32,fp16"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "--precisions 'fp32,fp16'" in run.stderr
    assert "exporting" not in run.stdout + run.stderr

"""`scripts/gpu-check`'s measured part at CPU-test size: the bf16-mixed step and the head-vs-floor timing run end to
end and report every phase (the GPU run itself needs the GPU machine: docs/performance.md, "GPU check")."""

from __future__ import annotations

import json

from vopd.tools.bench import gpu_check


def test_gpu_check_runs_at_tiny_size(tmp_path, one_thread):
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--tiny", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    step, head = result["step"], result["head"]
    assert step["master_dtype"] == "float32" and step["compute_dtype"] == "bfloat16"
    assert all(step[k] > 0 for k in ("teacher_s", "student_s", "optimizer_s"))
    assert set(step["peak_gib_after"]) == {"teacher", "student", "optimizer"}
    assert head["fused_s"] > 0 and head["floor_s"] > 0 and head["fused_over_floor"] > 0

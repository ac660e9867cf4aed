"""A failed trial names its cause at once: in its progress line and in its ``trials.jsonl`` record.

Ray writes a failed trial's exception to the driver's staging folder and reads it back from the trial's
storage, where it arrives only with the next sync; the progress line, printed as the trial fails, said
"unknown error (no exception was recorded)" while the closing line, printed later, named the cause.
"""

from __future__ import annotations

import json

from tests.search_helpers import run_cli

MODEL = '''
from torch import nn


class Fragile(nn.Module):
    """Trains at its full width only: every pruned copy fails when it is fine-tuned (evaluating it works,
    so the space's dry run, a forward pass in eval mode, keeps the group)."""

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))

    def forward(self, x):
        if self.training and self.conv.out_channels < 16:
            raise ValueError(f"pruned to {self.conv.out_channels} channels, this model wants 16")
        return self.head(self.bn(self.conv(x)).relu())
'''


def test_every_failed_trial_names_its_cause_in_its_progress_line_and_its_record(tmp_path):
    (tmp_path / "fragile.py").write_text(MODEL)
    done = run_cli(["run", "--model", "fragile.py:Fragile", "--dataset", "digits", "--method", "random",
                    "--trials", "2", "--concurrency", "1", "--pretrain-epochs", "1", "--finetune-epochs", "1",
                    "--set", "final.epochs=0", "--name", "f", "--storage", str(tmp_path / "runs")],
                   cache=tmp_path / "cache", cwd=tmp_path, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "INFO mlflow" not in done.stderr  # the new store's table creation is MLflow's business, not the user's
    lines = [line for line in done.stderr.splitlines() if line.startswith("[")]
    assert len(lines) == 2, done.stderr[-3000:]
    for line in lines:
        assert " failed: ValueError: pruned to " in line and "unknown error" not in line, line
    records = [json.loads(line) for line in (tmp_path / "runs" / "f" / "trials.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["failed", "failed"]
    assert all(r["error"].startswith("ValueError: pruned to ") for r in records), records

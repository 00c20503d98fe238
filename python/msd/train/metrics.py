"""Metrics of a training run (rank 0): one row per optimiser step in ``metrics.csv``, the same
scalars in TensorBoard when asked, and the progress bar's figures."""

from __future__ import annotations

import csv
from pathlib import Path

METRICS_FILE = "metrics.csv"
METRICS = ("step", "epoch", "loss", "vloss", "ploss", "accuracy", "lr", "samples_per_s", "samples",
           "multimodal_samples", "tokens", "tau")  # tau: empty on steps without evaluation


class MetricsLog:
    """Per-step rows in ``metrics.csv`` (and TensorBoard when asked); rank 0 only."""

    def __init__(self, output_dir: Path, resume_step: int, tensorboard: bool):
        self.path = output_dir / METRICS_FILE
        rows = []
        if self.path.is_file():  # a resumed run drops the rows logged after its checkpoint
            with open(self.path, newline="") as f:
                rows = [row for row in csv.DictReader(f) if int(row["step"]) <= resume_step]
        self.file = open(self.path, "w", newline="")  # noqa: SIM115 - open for the run, see close()
        self.writer = csv.DictWriter(self.file, METRICS)
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.tensorboard = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ValueError(f"tensorboard logging needs the tensorboard package: {error}") from None
            self.tensorboard = SummaryWriter(str(output_dir / "tensorboard"))
        self.last_tau = None  # shown in the progress bar

    def write(self, row: dict) -> None:
        """Log one step's row (its ``tau`` None or absent without evaluation)."""
        self.writer.writerow(row)
        self.file.flush()
        if self.tensorboard is not None:
            for key in ("loss", "vloss", "ploss", "accuracy", "lr", "samples_per_s"):
                self.tensorboard.add_scalar(f"train/{key}", row[key], row["step"])
            if row.get("tau") is not None:
                self.tensorboard.add_scalar("eval/tau", row["tau"], row["step"])

    def postfix(self, row: dict) -> dict[str, str]:
        """The progress bar's figures: the step's, and the last evaluated tau."""
        if row.get("tau") is not None:
            self.last_tau = row["tau"]
        postfix = {"loss": f"{row['loss']:.4f}", "acc": f"{row['accuracy']:.3f}", "lr": f"{row['lr']:.2e}"}
        return postfix | ({"tau": f"{self.last_tau:.2f}"} if self.last_tau is not None else {})

    def close(self) -> None:
        """Close the files."""
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()

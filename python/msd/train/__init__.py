"""Two-stage MSD draft training (MSD_SPEC.md 4)."""

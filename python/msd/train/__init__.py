"""Two-stage MSD draft training (MSD_SPEC.md section 4)."""

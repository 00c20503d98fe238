"""Training of the MSD draft head (MSD_SPEC.md section 4)."""

"""Training of the MSD draft head (MSD_SPEC.md section 4): conversation data, template and
loss masks (:mod:`msd.train.template`, :mod:`msd.train.data`)."""

"""Front ends of :class:`prh_lightning.tracking.AlignmentTracker` for training loops other than
Lightning's Trainer: :mod:`.huggingface` (``transformers.Trainer``)."""

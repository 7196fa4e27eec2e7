"""The probe helpers the callbacks share; they live in :mod:`prh_lightning.tracking.probe`
(framework-free) and are re-exported here for the callbacks."""

from prh_lightning.tracking.probe import (  # noqa: F401
    ForwardError,
    Probe,
    call_model,
    check_layer_selection,
    concat_batches,
    make_probe,
    module_device,
    module_dtype,
    move_inputs,
    num_rows,
    probe_features,
    probe_from_loader,
    side_effect_free,
    slice_inputs,
    split_batch,
)

default_forward = call_model  # the former name

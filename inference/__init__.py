"""The product: running a trained model. ``predict`` (photos and folders), ``batch_predict``
(sharded, resumable predict over large folders; the flow is ``flows.predict``), ``video``
(files and cameras: tracked visitors, counted once), ``stats`` (people per age band x
gender with intervals, corrected for a shop's mix), ``evaluate_folder`` (a model scored on
any labelled folder, and the reference for corrected counts). The pipeline that makes the
model is ``tasks/`` (one module per stage); both build on ``models/`` and ``core/``."""

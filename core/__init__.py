"""The lower layer every stage, model and flow uses: atomic storage, image decoding,
sharding and the label vocabulary. It imports nothing from ``tasks``, ``models`` or
``flows``."""

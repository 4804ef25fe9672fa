"""Checkpoint conversion: HF <-> mrlhf for every role, offline TP/PP resharding, inspection (docs/conversion.md).

``hf_config`` (config.json <-> configs), ``hf`` (the weight-mapping table, both directions), ``weights`` (lazy,
safe reading and sharded writing of HF files), ``runtime`` (forked ranks, all-or-nothing output), and the three
operations: ``import_hf``, ``export_hf``, ``reshard`` (with ``inspect_checkpoint``). ``tiny`` builds test models.
"""

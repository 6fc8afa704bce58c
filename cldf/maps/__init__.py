"""Per-slice maps: diffusion features, mean-gradient maps, CAMs and the CDM saliency baseline.

Each registered map (:mod:`cldf.registry`) is a function ``(model, batch, settings) -> arrays``;
:func:`cldf.maps.run.run_map` computes one for a shard of cases.
"""

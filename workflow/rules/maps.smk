# Cached per-slice maps, one registered map (cldf.registry.MAPS) at a time: the diffusion features of the
# decoder's slices, the mean-gradient maps, every CAM, the CAM classifier's probabilities and the CDM
# saliency. Each is computed by independent shard jobs (groups of cases) and gathered into one Zarr store.
# A job's params hold only the settings its map depends on, so e.g. switching cldf.cam never recomputes
# features.


rule map_shard:
    input:
        slices=CAT.pattern("slices"),
        model=lambda w: [CAT.path("model", dataset=w.dataset, model=k) for k in MAPS_BY_STORE[w.map].models],
    output:
        temp(directory(CAT.pattern("map_shard"))),
    params:
        name=lambda w: MAPS_BY_STORE[w.map].name,
        settings=lambda w: as_json(PLAN.map_settings(w.map)),
        cases=shard_cases,
        device=DEVICE,
        seed=SEED,
    log:
        CAT.log(CAT.pattern("map_shard")),
    benchmark:
        CAT.benchmark(CAT.pattern("map_shard"))
    threads: 1
    priority: lambda w: PLAN.priority("map", w.map)
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=GPU,
    conda:
        CONDA_ENV
    shell:
        "cldf map --map {params.name} --slices {input.slices:q} --model {input.model:q}"
        " --settings {params.settings:q} --cases {params.cases} --out {output:q}"
        " --device {params.device} --seed {params.seed} --threads {threads} > {log:q} 2>&1"


rule gather_map:
    """Gather the shards of one map into a single store (streamed, row by row)."""
    input:
        lambda w: shard_paths("map_shard", w.dataset, map=w.map),
    output:
        directory(CAT.pattern("map")),
    log:
        CAT.log(CAT.pattern("map")),
    priority: lambda w: PLAN.priority("map", w.map)
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        CONDA_ENV
    shell:
        "cldf gather --shards {input:q} --out {output:q} > {log:q} 2>&1"


rule fuse_cam:
    """Fuse a per-layer CAM (LayerCAM) over the layers chosen on validation."""
    input:
        map=lambda w: CAT.path("map", dataset=w.dataset, map=MAPS[w.cam].store),
        choices=CAT.pattern("layer_choices"),
    output:
        directory(CAT.pattern("fused_cam")),
    params:
        settings=as_json(PLAN.map_choice_settings()),
    wildcard_constraints:
        cam="|".join(PLAN.per_layer_cams()) or "-",
    log:
        CAT.log(CAT.pattern("fused_cam")),
    priority: 2
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        CONDA_ENV
    shell:
        "cldf fuse-cam --map {input.map:q} --name {wildcards.cam} --choices {input.choices:q}"
        " --settings {params.settings:q} --out {output:q} > {log:q} 2>&1"

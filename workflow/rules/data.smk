# NIfTI volumes → preprocessed 2-D slices (sharded by case, then gathered).


rule phantom:
    """Generate the synthetic BraTS-layout phantom (the embedded default dataset)."""
    output:
        f"{R}/{{dataset}}/phantom.json",
    params:
        dataset=lambda w: as_json(ds_settings(w.dataset)),
    log:
        f"{R}/logs/{{dataset}}/phantom.log",
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "cldf phantom --dataset {params.dataset:q} --manifest {output} > {log} 2>&1"


rule slices_shard:
    """Read, validate, normalise and slice the cases of one shard."""
    input:
        raw_inputs,
    output:
        temp(directory(f"{R}/{{dataset}}/shards/slices/{{shard}}.zarr")),
    params:
        dataset=lambda w: as_json(ds_settings(w.dataset)),
        cases=lambda w: shard_cases(w.dataset, w.shard),
    log:
        f"{R}/logs/{{dataset}}/slices/{{shard}}.log",
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "cldf slices-shard --dataset {params.dataset:q} --cases {params.cases} --out {output} > {log} 2>&1"


rule slices:
    """Gather the slice shards into slices.zarr and write the human-readable manifest."""
    input:
        lambda w: shard_paths("{R}/{dataset}/shards/slices/{shard}.zarr", w.dataset),
    output:
        zarr=directory(f"{R}/{{dataset}}/slices.zarr"),
        manifest=f"{R}/{{dataset}}/slices.csv",
    log:
        f"{R}/logs/{{dataset}}/slices_gather.log",
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "cldf slices-gather --shards {input} --out {output.zarr} --manifest {output.manifest} > {log} 2>&1"

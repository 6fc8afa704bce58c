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
        "cldf phantom --dataset {params.dataset:q} --manifest {output:q} > {log:q} 2>&1"


rule slices_shard:
    """Read, validate, normalise and slice the cases of one shard."""
    input:
        raw_inputs,
    output:
        temp(directory(f"{R}/{{dataset}}/shards/slices/{{shard}}.zarr")),
    params:
        dataset=lambda w: as_json({k: v for k, v in ds_settings(w.dataset).items() if k != "split"}),
        cases=lambda w: shard_cases(w.dataset, w.shard),
    log:
        f"{R}/logs/{{dataset}}/slices/{{shard}}.log",
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "cldf slices-shard --dataset {params.dataset:q} --cases {params.cases} --out {output:q} > {log:q} 2>&1"


rule slices:
    """Gather the slice shards into slices.zarr, assign the splits from the kept cases, write the
    human-readable manifest and the list of skipped cases."""
    input:
        lambda w: shard_paths("{R}/{dataset}/shards/slices/{shard}.zarr", w.dataset),
    output:
        zarr=directory(f"{R}/{{dataset}}/slices.zarr"),
        manifest=f"{R}/{{dataset}}/slices.csv",
        skipped=f"{R}/{{dataset}}/skipped_cases.csv",
    params:
        split=lambda w: as_json(ds_settings(w.dataset)["split"]),
    log:
        f"{R}/logs/{{dataset}}/slices_gather.log",
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "cldf slices-gather --shards {input:q} --out {output.zarr:q} --manifest {output.manifest:q}"
        " --skipped {output.skipped:q} --split {params.split:q} > {log:q} 2>&1"

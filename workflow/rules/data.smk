# NIfTI volumes → preprocessed 2-D slices (sharded by case, then gathered).


rule phantom:
    """Generate the synthetic BraTS-layout phantom (the embedded default dataset)."""
    output:
        CAT.pattern("phantom"),
    params:
        dataset=lambda w: as_json(planned(PLAN.dataset, w.dataset)),
    log:
        CAT.log(CAT.pattern("phantom")),
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        CONDA_ENV
    shell:
        "cldf phantom --dataset {params.dataset:q} --manifest {output:q} > {log:q} 2>&1"


rule slices_shard:
    """Read, check, normalise and slice the cases of one shard."""
    input:
        lambda w: planned(PLAN.raw_inputs, w.dataset, w.shard),
    output:
        temp(directory(CAT.pattern("slice_shard"))),
    params:
        dataset=lambda w: as_json({k: v for k, v in planned(PLAN.dataset, w.dataset).items() if k != "split"}),
        cases=shard_cases,
    log:
        CAT.log(CAT.pattern("slice_shard")),
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        CONDA_ENV
    shell:
        "cldf slices-shard --dataset {params.dataset:q} --cases {params.cases} --out {output:q} > {log:q} 2>&1"


rule slices:
    """Gather the slice shards, assign the splits from the kept cases, keep the test masks apart (only
    evaluation reads them), write the manifest and the list of skipped cases."""
    input:
        lambda w: shard_paths("slice_shard", w.dataset),
    output:
        store=directory(CAT.pattern("slices")),
        truth=directory(CAT.pattern("test_truth")),
        manifest=CAT.pattern("slices_csv"),
        skipped=CAT.pattern("skipped_cases"),
    params:
        split=lambda w: as_json(planned(PLAN.dataset, w.dataset)["split"]),
    log:
        CAT.log(CAT.pattern("slices")),
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        CONDA_ENV
    shell:
        "cldf slices-gather --shards {input:q} --out {output.store:q} --test-truth {output.truth:q} --manifest {output.manifest:q}"
        " --skipped {output.skipped:q} --split {params.split:q} > {log:q} 2>&1"

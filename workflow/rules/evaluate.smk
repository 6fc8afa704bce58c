# The comparison table under both protocols, intervals and paired differences, 3-D results, the figure.


rule metrics:
    input:
        slices=CAT.pattern("slices"),
        truth=CAT.pattern("test_truth"),
        probs=PROBS,
        choices=SELECTION,
        masks=row_masks,
    output:
        table=report(CAT.pattern("metrics"), caption="../report/metrics.rst", category="Results"),
        per_slice=CAT.pattern("metrics_per_slice"),
        per_case=CAT.pattern("metrics_per_case"),
        differences=CAT.pattern("differences"),
    params:
        rows=lambda w: as_json(PLAN.rows(w.dataset)),
        settings=as_json(PLAN.evaluation_settings()),
        seed=SEED,
    log:
        CAT.log(CAT.pattern("metrics")),
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        CONDA_ENV
    shell:
        "cldf metrics --slices {input.slices:q} --test-truth {input.truth:q} --probs {input.probs:q}"
        " --choices {input.choices:q} --rows {params.rows:q} --settings {params.settings:q} --seed {params.seed}"
        " --out {output.table:q} --per-slice {output.per_slice:q} --per-case {output.per_case:q}"
        " --differences {output.differences:q} > {log:q} 2>&1"


rule metrics_3d:
    """3-D Dice and HD95 (mm) of every row in each test scan's own geometry, against its original mask file."""
    input:
        slices=CAT.pattern("slices"),
        probs=PROBS,
        choices=SELECTION,
        masks=row_masks,
        raw=lambda w: sorted({p for k in planned(PLAN.shards, w.dataset) for p in planned(PLAN.raw_inputs, w.dataset, k)}),
    output:
        CAT.pattern("metrics_3d"),
    params:
        rows=lambda w: as_json(PLAN.rows(w.dataset)),
        dataset=lambda w: as_json(planned(PLAN.dataset, w.dataset)),
    log:
        CAT.log(CAT.pattern("metrics_3d")),
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        CONDA_ENV
    shell:
        "cldf metrics-3d --slices {input.slices:q} --dataset {params.dataset:q} --probs {input.probs:q}"
        " --choices {input.choices:q} --rows {params.rows:q} --out {output:q} > {log:q} 2>&1"


rule figure:
    input:
        slices=CAT.pattern("slices"),
        truth=CAT.pattern("test_truth"),
        cam=lambda w: PLAN.final_map(w.dataset, MAPS[config["cldf"]["cam"]]),
        mg=MEAN_GRADIENT,
        cldf=CAT.pattern("cldf_masks", cam=config["cldf"]["cam"], protocol="labelled"),
        metrics=CAT.pattern("metrics"),
        choices=SELECTION,
        baselines=lambda w: PLAN.figure_baselines(w.dataset).values(),
    output:
        report(CAT.pattern("figure"), caption="../report/figure.rst", category="Results"),
    params:
        baselines=lambda w: as_json(PLAN.figure_baselines(w.dataset)),
        settings=as_json(config["cldf"]["selection"]),
    log:
        CAT.log(CAT.pattern("figure")),
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        CONDA_ENV
    shell:
        "cldf figure --slices {input.slices:q} --test-truth {input.truth:q} --cam {input.cam:q} --mg {input.mg:q}"
        " --cldf {input.cldf:q} --metrics {input.metrics:q} --baselines {params.baselines:q}"
        " --choices {input.choices:q} --settings {params.settings:q} --out {output:q} > {log:q} 2>&1"


rule ablation:
    """CLDF with one lever changed at a time (config key ablation): validation Dice, test Dice with interval."""
    input:
        slices=CAT.pattern("slices"),
        truth=CAT.pattern("test_truth"),
        features=FEATURES,
        cam=lambda w: PLAN.final_map(w.dataset, MAPS[config["cldf"]["cam"]]),
        mg=MEAN_GRADIENT,
        tuning=CAT.pattern("tuning", cam=config["cldf"]["cam"]),
        networks=lambda w: feature_networks(w.dataset).values(),
    output:
        CAT.pattern("ablation"),
    params:
        settings=as_json(PLAN.ablation_settings("ablation")),
        networks=lambda w: " ".join(shlex.quote(f"{kind}={path}") for kind, path in feature_networks(w.dataset).items()),
        device=DEVICE,
        seed=SEED,
    log:
        CAT.log(CAT.pattern("ablation")),
    benchmark:
        CAT.benchmark(CAT.pattern("ablation"))
    threads: TRAIN_THREADS
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=GPU,
    conda:
        CONDA_ENV
    shell:
        "cldf ablation --slices {input.slices:q} --test-truth {input.truth:q} --features {input.features:q}"
        " --networks {params.networks} --cam {input.cam:q} --mg {input.mg:q} --tuning {input.tuning:q}"
        " --settings {params.settings:q} --out {output:q} --device {params.device} --seed {params.seed}"
        " --threads {threads} > {log:q} 2>&1"


use rule ablation as table2 with:
    output:
        CAT.pattern("table2"),
    params:
        settings=as_json(PLAN.ablation_settings("table2")),
        networks=lambda w: " ".join(shlex.quote(f"{kind}={path}") for kind, path in feature_networks(w.dataset).items()),
        device=DEVICE,
        seed=SEED,
    log:
        CAT.log(CAT.pattern("table2")),
    benchmark:
        CAT.benchmark(CAT.pattern("table2"))


rule table3:
    """Paper Table 3: CAM alone, CAM + CL, MG + CL and CAM ∧ MG + CL for each CAM of table3.cams."""
    input:
        slices=CAT.pattern("slices"),
        truth=CAT.pattern("test_truth"),
        masks=lambda w: sorted({row["masks"] for row in PLAN.table3_rows(w.dataset)}),
    output:
        CAT.pattern("table3"),
    params:
        rows=lambda w: as_json(PLAN.table3_rows(w.dataset)),
        settings=as_json(PLAN.evaluation_settings()),
        seed=SEED,
    log:
        CAT.log(CAT.pattern("table3")),
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        CONDA_ENV
    shell:
        "cldf table3 --slices {input.slices:q} --test-truth {input.truth:q} --rows {params.rows:q}"
        " --settings {params.settings:q} --seed {params.seed} --out {output:q} > {log:q} 2>&1"

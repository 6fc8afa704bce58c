# The comparison table (paper Table 1 / Table 3 shape), the qualitative figure and the report.


rule metrics:
    input:
        slices=CAT.pattern("slices"),
        masks=lambda w: [row["masks"] for row in PLAN.table_rows(w.dataset).values()],
    output:
        table=report(CAT.pattern("metrics"), caption="../report/metrics.rst", category="Results"),
        per_slice=CAT.pattern("metrics_per_slice"),
    params:
        methods=lambda w: as_json(PLAN.table_rows(w.dataset)),
    log:
        CAT.log(CAT.pattern("metrics")),
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        CONDA_ENV
    shell:
        "cldf metrics --slices {input.slices:q} --methods {params.methods:q} --out {output.table:q}"
        " --per-slice {output.per_slice:q} > {log:q} 2>&1"


rule figure:
    input:
        slices=CAT.pattern("slices"),
        cam=CAT.pattern("map", map=f"cams/{config['cldf']['cam']}"),
        mg=CAT.pattern("map", map="mean_gradient"),
        cldf=CAT.pattern("cldf_masks", selection="fused", cam=config["cldf"]["cam"]),
        metrics=CAT.pattern("metrics"),
        baselines=lambda w: PLAN.figure_baselines(w.dataset).values(),
    output:
        report(CAT.pattern("figure"), caption="../report/figure.rst", category="Results"),
    params:
        baselines=lambda w: as_json(PLAN.figure_baselines(w.dataset)),
        selection=as_json(config["cldf"]["selection"]),
    log:
        CAT.log(CAT.pattern("figure")),
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        CONDA_ENV
    shell:
        "cldf figure --slices {input.slices:q} --cam {input.cam:q} --mg {input.mg:q} --cldf {input.cldf:q}"
        " --metrics {input.metrics:q} --baselines {params.baselines:q} --selection {params.selection:q}"
        " --out {output:q} > {log:q} 2>&1"

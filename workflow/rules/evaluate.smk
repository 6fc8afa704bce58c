# The comparison table (paper Table 1 / Table 3 shape), the qualitative figure and the report.


rule metrics:
    input:
        slices=SLICES,
        masks=lambda w: [m for m, _ in method_masks(w.dataset).values()],
    output:
        table=report(f"{R}/{{dataset}}/metrics.csv", caption="../report/metrics.rst", category="Results"),
        per_slice=f"{R}/{{dataset}}/metrics_per_slice.csv",
    params:
        methods=lambda w: as_json({k: {"masks": m, "cam": c} for k, (m, c) in method_masks(w.dataset).items()}),
    log:
        f"{R}/logs/{{dataset}}/metrics.log",
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "cldf metrics --slices {input.slices:q} --methods {params.methods:q} --out {output.table:q}"
        " --per-slice {output.per_slice:q} > {log:q} 2>&1"


def figure_baselines(dataset):
    """Baselines without contrastive learning, for the 'best baseline' column of the figure."""
    rows = method_masks(dataset)
    names = [CAM_NAMES[c] for c in CAMS] + ["MG", "CDM saliency"]
    return {name: rows[name][0] for name in names}


rule figure:
    input:
        slices=SLICES,
        cam=f"{R}/{{dataset}}/cams/{config['cldf']['cam']}.zarr",
        mg=f"{R}/{{dataset}}/mean_gradient.zarr",
        cldf=f"{R}/{{dataset}}/cldf/{config['cldf']['cam']}/masks.zarr",
        metrics=f"{R}/{{dataset}}/metrics.csv",
        baselines=lambda w: figure_baselines(w.dataset).values(),
    output:
        report(f"{R}/{{dataset}}/figure.png", caption="../report/figure.rst", category="Results"),
    params:
        baselines=lambda w: as_json(figure_baselines(w.dataset)),
        selection=as_json(config["cldf"]["selection"]),
    log:
        f"{R}/logs/{{dataset}}/figure.log",
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "cldf figure --slices {input.slices:q} --cam {input.cam:q} --mg {input.mg:q} --cldf {input.cldf:q}"
        " --metrics {input.metrics:q} --baselines {params.baselines:q} --selection {params.selection:q}"
        " --out {output:q} > {log:q} 2>&1"

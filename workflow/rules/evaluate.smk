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
        "cldf metrics --slices {input.slices} --methods {params.methods:q} --out {output.table}"
        " --per-slice {output.per_slice} > {log} 2>&1"


rule figure:
    input:
        slices=SLICES,
        panels=lambda w: figure_panels(w.dataset).values(),
    output:
        report(f"{R}/{{dataset}}/figure.png", caption="../report/figure.rst", category="Results"),
    params:
        panels=lambda w: as_json(figure_panels(w.dataset)),
    log:
        f"{R}/logs/{{dataset}}/figure.log",
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "cldf figure --slices {input.slices} --panels {params.panels:q} --out {output} > {log} 2>&1"


def figure_panels(dataset):
    cam = config["cldf"]["cam"]
    return {
        "cam": f"{R}/{dataset}/cams/{cam}.zarr",
        "mg": f"{R}/{dataset}/mean_gradient.zarr",
        "cldf": f"{R}/{dataset}/cldf/{cam}/masks.zarr",
        "baseline": f"{R}/{dataset}/baselines/mean_gradient/masks.zarr",
    }

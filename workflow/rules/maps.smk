# Cached per-slice maps: diffusion features, mean-gradient maps, CAMs, the CAM classifier's probabilities
# and the CDM-saliency baseline.
# Each is computed by independent shard jobs (groups of cases) and gathered into one Zarr store.
# Each rule's params hold only the settings it depends on, so e.g. switching cldf.cam never
# recomputes features.

SLICES = f"{R}/{{dataset}}/slices.zarr"


rule features_shard:
    input:
        slices=SLICES,
        cdm=f"{R}/{{dataset}}/models/cdm.pt",
    output:
        temp(directory(f"{R}/{{dataset}}/shards/features/{{shard}}.zarr")),
    params:
        settings=as_json(config["features"]),
        cases=lambda w: shard_cases(w.dataset, w.shard),
    log:
        f"{R}/logs/{{dataset}}/features/{{shard}}.log",
    benchmark:
        f"{R}/benchmarks/{{dataset}}/features/{{shard}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=GPU,
    shell:
        "cldf features --slices {input.slices:q} --cdm {input.cdm:q} --settings {params.settings:q}"
        " --cases {params.cases} --out {output:q} --device {DEVICE} --seed {SEED} --threads {threads} > {log:q} 2>&1"


rule gradient_shard:
    input:
        slices=SLICES,
        classifier=f"{R}/{{dataset}}/models/noisy_classifier.pt",
    output:
        temp(directory(f"{R}/{{dataset}}/shards/mean_gradient/{{shard}}.zarr")),
    params:
        settings=as_json(config["gradient"]),
        cases=lambda w: shard_cases(w.dataset, w.shard),
    log:
        f"{R}/logs/{{dataset}}/mean_gradient/{{shard}}.log",
    benchmark:
        f"{R}/benchmarks/{{dataset}}/mean_gradient/{{shard}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=GPU,
    shell:
        "cldf gradient --slices {input.slices:q} --classifier {input.classifier:q} --settings {params.settings:q}"
        " --cases {params.cases} --out {output:q} --device {DEVICE} --seed {SEED} --threads {threads} > {log:q} 2>&1"


def cam_settings(method):
    """The `cams:` keys one CAM method uses, so that e.g. changing layercam_layers re-runs LayerCAM only."""
    keys = {"layercam": ["layercam_layers"], "scorecam": ["layers", "scorecam_channels"]}.get(method, ["layers"])
    return {k: config["cams"][k] for k in keys + ["batch_size"]}


rule cam_shard:
    input:
        slices=SLICES,
        classifier=f"{R}/{{dataset}}/models/cam_classifier.pt",
    output:
        temp(directory(f"{R}/{{dataset}}/shards/cams/{{cam}}/{{shard}}.zarr")),
    params:
        settings=lambda w: as_json(cam_settings(w.cam)),
        cases=lambda w: shard_cases(w.dataset, w.shard),
    log:
        f"{R}/logs/{{dataset}}/cams/{{cam}}/{{shard}}.log",
    benchmark:
        f"{R}/benchmarks/{{dataset}}/cams/{{cam}}/{{shard}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=GPU,
    shell:
        "cldf cam --slices {input.slices:q} --classifier {input.classifier:q} --method {wildcards.cam}"
        " --settings {params.settings:q} --cases {params.cases} --out {output:q} --device {DEVICE}"
        " --threads {threads} > {log:q} 2>&1"


rule probs_shard:
    """The CAM classifier's positive-class probabilities (they gate CLDF's and the baselines' masks)."""
    input:
        slices=SLICES,
        classifier=f"{R}/{{dataset}}/models/cam_classifier.pt",
    output:
        temp(directory(f"{R}/{{dataset}}/shards/classifier_probs/{{shard}}.zarr")),
    params:
        settings=as_json({"batch_size": config["cams"]["batch_size"]}),
        cases=lambda w: shard_cases(w.dataset, w.shard),
    log:
        f"{R}/logs/{{dataset}}/classifier_probs/{{shard}}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
        gpu=GPU,
    shell:
        "cldf probs --slices {input.slices:q} --classifier {input.classifier:q} --settings {params.settings:q}"
        " --cases {params.cases} --out {output:q} --device {DEVICE} --threads {threads} > {log:q} 2>&1"


rule saliency_shard:
    input:
        slices=SLICES,
        cdm=f"{R}/{{dataset}}/models/cdm.pt",
    output:
        temp(directory(f"{R}/{{dataset}}/shards/saliency/{{shard}}.zarr")),
    params:
        settings=as_json(config["saliency"]),
        cases=lambda w: shard_cases(w.dataset, w.shard),
    log:
        f"{R}/logs/{{dataset}}/saliency/{{shard}}.log",
    benchmark:
        f"{R}/benchmarks/{{dataset}}/saliency/{{shard}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=GPU,
    shell:
        "cldf saliency --slices {input.slices:q} --cdm {input.cdm:q} --settings {params.settings:q}"
        " --cases {params.cases} --out {output:q} --device {DEVICE} --seed {SEED} --threads {threads} > {log:q} 2>&1"


def gather_map_input(wildcards):
    """Every shard of a map (the saliency baseline holds the test slices of each shard only)."""
    return [f"{R}/{wildcards.dataset}/shards/{wildcards.map}/{k}.zarr" for k in range(n_shards(wildcards.dataset))]


rule gather_map:
    """Gather the shards of one map kind into a single store (streamed, row by row)."""
    input:
        gather_map_input,
    output:
        directory(f"{R}/{{dataset}}/{{map}}.zarr"),
    wildcard_constraints:
        map="features|mean_gradient|saliency|classifier_probs|cams/(" + "|".join(CAMS) + ")",
    log:
        f"{R}/logs/{{dataset}}/gather_{{map}}.log",
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "cldf gather --shards {input:q} --out {output:q} > {log:q} 2>&1"

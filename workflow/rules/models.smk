# The three networks CLDF needs, plus the fully supervised upper bound (comparison only).


# One process per GPU under torchrun when a training job gets several GPUs (DistributedDataParallel).
TRAIN_LAUNCHER = (
    f"torchrun --standalone --nproc_per_node {config['train_gpus']} -m cldf.cli"
    if config["train_gpus"] > 1
    else "cldf"
)


rule train_model:
    """Train one model on the training split (image-level labels; masks only for fsl_unet)."""
    input:
        f"{R}/{{dataset}}/slices.zarr",
    output:
        model=f"{R}/{{dataset}}/models/{{kind}}.pt",
        metrics=f"{R}/{{dataset}}/models/{{kind}}.json",
    log:
        f"{R}/logs/{{dataset}}/train_{{kind}}.log",
    benchmark:
        f"{R}/benchmarks/{{dataset}}/train_{{kind}}.tsv"
    threads: TRAIN_THREADS
    params:
        settings=lambda w: as_json(model_settings(config, w.kind)),
        launcher=TRAIN_LAUNCHER,
    resources:
        mem_mb=8000,
        runtime=lambda w: 1440 if config["model_preset"] == "paper" else 60,
        gpu=GPU * config["train_gpus"],
    shell:
        "{params.launcher} train --kind {wildcards.kind} --slices {input:q} --settings {params.settings:q} --out {output.model:q}"
        " --device {DEVICE} --seed {SEED} --threads {threads} > {log:q} 2>&1"


rule cdm_samples:
    """Class-conditional samples of the CDM (y=0 row, y=1 row) as a PNG grid."""
    input:
        f"{R}/{{dataset}}/models/cdm.pt",
    output:
        f"{R}/{{dataset}}/models/cdm_samples.png",
    log:
        f"{R}/logs/{{dataset}}/cdm_samples.log",
    threads: TRAIN_THREADS
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=GPU,
    shell:
        "cldf samples --cdm {input:q} --out {output:q} --device {DEVICE} --seed {SEED} --threads {threads} > {log:q} 2>&1"

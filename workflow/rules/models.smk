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
        slices=CAT.pattern("slices"),
        context=lambda w: [CAT.path("model", dataset=w.dataset, model=k) for k in METHOD_NETWORKS.get(w.model, ())],
    output:
        model=CAT.pattern("model"),
        metrics=CAT.pattern("model_metrics"),
    log:
        CAT.log(CAT.pattern("model")),
    benchmark:
        CAT.benchmark(CAT.pattern("model"))
    threads: TRAIN_THREADS
    priority: lambda w: PLAN.priority("model", w.model)
    params:
        device=DEVICE,
        seed=SEED,
        settings=lambda w: as_json(planned(PLAN.model_settings, w.model)),
        launcher=TRAIN_LAUNCHER,
        context=lambda w, input: " ".join(f"{k}={shlex.quote(p)}" for k, p in zip(METHOD_NETWORKS.get(w.model, ()),
                                                                                    input.context)),
    resources:
        mem_mb=8000,
        runtime=lambda w: 1440 if config["model_preset"] == "paper" else 60,
        gpu=GPU * config["train_gpus"],
    conda:
        CONDA_ENV
    shell:
        "{params.launcher} train --kind {wildcards.model} --slices {input.slices:q} --settings {params.settings:q}"
        " --context {params.context}"
        " --out {output.model:q} --device {params.device} --seed {params.seed} --threads {threads} > {log:q} 2>&1"


rule cdm_samples:
    """Class-conditional samples of the CDM (y=0 row, y=1 row) as a PNG grid."""
    input:
        CAT.pattern("model", model="cdm"),
    output:
        CAT.pattern("cdm_samples"),
    params:
        device=DEVICE,
        seed=SEED,
    log:
        CAT.log(CAT.pattern("cdm_samples")),
    threads: TRAIN_THREADS
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=GPU,
    conda:
        CONDA_ENV
    shell:
        "cldf samples --cdm {input:q} --out {output:q} --device {params.device} --seed {params.seed} --threads {threads} > {log:q} 2>&1"

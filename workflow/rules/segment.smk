# CLDF proper: fused pixel selection + contrastive pixel decoder, K-means masks (one decoder per selection
# mode: fused = CLDF, cam and mg = the ablations); the thresholded baselines and the fully supervised upper
# bound; masks written back as NIfTI.

PROBS = CAT.pattern("map", map="classifier_probs")


for _mode in SELECTION_DIRS:
    _DECODER = CAT.pattern("decoder", selection=_mode)
    _SHARD = CAT.pattern("cldf_mask_shard", selection=_mode)
    _MASKS = CAT.pattern("cldf_masks", selection=_mode)

    rule:
        name:
            f"decoder_{_mode}"
        input:
            slices=CAT.pattern("slices"),
            features=CAT.pattern("map", map="features"),
            **decoder_maps(_mode),
        output:
            _DECODER,
        params:
            device=DEVICE,
            seed=SEED,
            settings=as_json(PLAN.decoder_settings(_mode)),
            maps=lambda w, input, mode=_mode: " ".join(f"--{n} {shlex.quote(input[n])}" for n in decoder_maps(mode)),
        log:
            CAT.log(_DECODER),
        benchmark:
            CAT.benchmark(_DECODER)
        threads: TRAIN_THREADS
        resources:
            mem_mb=6000,
            runtime=60,
            gpu=GPU,
        conda:
            CONDA_ENV
        shell:
            "cldf decoder --slices {input.slices:q} --features {input.features:q} {params.maps}"
            " --settings {params.settings:q} --out {output:q} --device {params.device} --seed {params.seed} --threads {threads}"
            " > {log:q} 2>&1"

    rule:
        name:
            f"segment_shard_{_mode}"
        input:
            slices=CAT.pattern("slices"),
            features=CAT.pattern("map", map="features"),
            probs=PROBS,
            decoder=_DECODER,
        output:
            temp(directory(_SHARD)),
        params:
            device=DEVICE,
            seed=SEED,
            settings=as_json(config["cldf"]["cluster"]),
            cases=shard_cases,
        log:
            CAT.log(_SHARD),
        benchmark:
            CAT.benchmark(_SHARD)
        threads: 1
        resources:
            mem_mb=4000,
            runtime=60,
        conda:
            CONDA_ENV
        shell:
            "cldf segment --slices {input.slices:q} --features {input.features:q} --decoder {input.decoder:q}"
            " --probs {input.probs:q} --settings {params.settings:q} --cases {params.cases} --out {output:q}"
            " --device {params.device} --seed {params.seed} --threads {threads} > {log:q} 2>&1"

    rule:
        name:
            f"masks_{_mode}"
        input:
            lambda w, mode=_mode: shard_paths("cldf_mask_shard", w.dataset, selection=mode, cam=getattr(w, "cam", "")),
        output:
            directory(_MASKS),
        log:
            CAT.log(_MASKS),
        resources:
            mem_mb=2000,
            runtime=30,
        conda:
            CONDA_ENV
        shell:
            "cldf gather --shards {input:q} --out {output:q} > {log:q} 2>&1"


rule baseline_masks:
    """Threshold a CAM, MG or saliency map into masks of the test slices (one rule for all)."""
    input:
        slices=CAT.pattern("slices"),
        map=lambda w: CAT.path("map", dataset=w.dataset, map=MAPS[w.baseline].store),
        probs=PROBS,
    output:
        directory(CAT.pattern("baseline_masks")),
    wildcard_constraints:
        baseline="|".join(m.name for m in PLAN.baseline_maps()),
    log:
        CAT.log(CAT.pattern("baseline_masks")),
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        CONDA_ENV
    shell:
        "cldf baseline --slices {input.slices:q} --map {input.map:q} --probs {input.probs:q} --out {output:q} > {log:q} 2>&1"


rule fsl_masks:
    """Masks of the fully supervised UNet on the test slices (the upper bound of the table)."""
    input:
        slices=CAT.pattern("slices"),
        model=CAT.pattern("model", model="fsl_unet"),
    output:
        directory(CAT.pattern("baseline_masks", baseline="fsl_unet")),
    params:
        device=DEVICE,
        seed=SEED,
    log:
        CAT.log(CAT.pattern("baseline_masks", baseline="fsl_unet")),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=GPU,
    conda:
        CONDA_ENV
    shell:
        "cldf predict-fsl --slices {input.slices:q} --model {input.model:q} --out {output:q} --device {params.device}"
        " --threads {threads} > {log:q} 2>&1"


rule nifti:
    """CLDF masks of every test case as NIfTI in the case's original geometry."""
    input:
        slices=CAT.pattern("slices"),
        masks=CAT.pattern("cldf_masks", selection="fused"),
    output:
        directory(CAT.pattern("nifti")),
    log:
        CAT.log(CAT.pattern("nifti")),
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        CONDA_ENV
    shell:
        "cldf nifti --slices {input.slices:q} --masks {input.masks:q} --out {output:q} > {log:q} 2>&1"

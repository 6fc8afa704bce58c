# Masks of the test slices: CLDF under both protocols (features computed on the fly by the frozen CDM,
# conditioned as the protocol allows), its selection ablations for Table 3 (labelled protocol), the
# thresholded baselines, the intensity threshold, the fully supervised upper bound; CLDF's masks written
# back as NIfTI.


rule segment_shard:
    input:
        slices=CAT.pattern("slices"),
        cdm=CAT.pattern("model", model="cdm"),
        decoders=lambda w: PLAN.decoders(w.dataset, w.cam).values(),
        choices=lambda w: [CAT.path("unlabelled_choices", dataset=w.dataset, cam=w.cam)] if w.protocol == "unlabelled" else [],
        tuning=CAT.pattern("tuning"),
        probs=PROBS,
    output:
        temp(directory(CAT.pattern("cldf_mask_shard"))),
    params:
        decoders=lambda w: as_json(PLAN.decoders(w.dataset, w.cam)),
        protocol=lambda w: w.protocol,
        choices=choices_option,
        settings=as_json(PLAN.segment_settings()),
        cases=shard_cases,
        device=DEVICE,
        seed=SEED,
    log:
        CAT.log(CAT.pattern("cldf_mask_shard")),
    benchmark:
        CAT.benchmark(CAT.pattern("cldf_mask_shard"))
    threads: 1
    priority: 2
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=GPU,
    conda:
        CONDA_ENV
    shell:
        "cldf segment --slices {input.slices:q} --cdm {input.cdm:q} --decoders {params.decoders:q}"
        " --protocol {params.protocol} {params.choices} --tuning {input.tuning:q} --probs {input.probs:q}"
        " --settings {params.settings:q} --cases {params.cases} --out {output:q}"
        " --device {params.device} --seed {params.seed} --threads {threads} > {log:q} 2>&1"


use rule segment_shard as ablation_shard with:
    """Masks of Table 3's selection ablations (CAM + CL, MG + CL), labelled protocol."""
    input:
        slices=CAT.pattern("slices"),
        cdm=CAT.pattern("model", model="cdm"),
        decoders=lambda w: PLAN.decoders(w.dataset, w.cam, ablation=True).values(),
        tuning=CAT.pattern("tuning"),
        probs=PROBS,
    output:
        temp(directory(CAT.pattern("ablation_mask_shard"))),
    params:
        decoders=lambda w: as_json(PLAN.decoders(w.dataset, w.cam, ablation=True)),
        protocol="labelled",
        choices="",
        settings=as_json(PLAN.segment_settings()),
        cases=shard_cases,
        device=DEVICE,
        seed=SEED,
    log:
        CAT.log(CAT.pattern("ablation_mask_shard")),
    benchmark:
        CAT.benchmark(CAT.pattern("ablation_mask_shard"))
    priority: 0


rule cldf_masks:
    input:
        lambda w: shard_paths("cldf_mask_shard", w.dataset, cam=w.cam, protocol=w.protocol),
    output:
        directory(CAT.pattern("cldf_masks")),
    log:
        CAT.log(CAT.pattern("cldf_masks")),
    priority: 2
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        CONDA_ENV
    shell:
        "cldf gather --shards {input:q} --out {output:q} > {log:q} 2>&1"


use rule cldf_masks as ablation_masks with:
    input:
        lambda w: shard_paths("ablation_mask_shard", w.dataset, cam=w.cam),
    output:
        directory(CAT.pattern("ablation_masks")),
    log:
        CAT.log(CAT.pattern("ablation_masks")),
    priority: 0


rule baselines:
    """The baseline rows: each thresholded map (a CAM, MG, a saliency map; its threshold chosen on
    validation) and one image channel (the intensity row: channel and side chosen on validation) turned
    into masks of the test slices. One short job: it only reads maps and thresholds them."""
    input:
        slices=CAT.pattern("slices"),
        maps=lambda w: list(PLAN.thresholded_maps(w.dataset).values()),
    output:
        choices=CAT.pattern("map_choices"),
        masks=[directory(CAT.pattern("baseline_masks", baseline=name)) for name in PLAN.baseline_names()],
    params:
        maps=lambda w: as_json(PLAN.thresholded_maps(w.dataset)),
        masks=lambda w: as_json(PLAN.baseline_masks(w.dataset)),
        settings=as_json(PLAN.map_choice_settings()),
    log:
        CAT.log(CAT.pattern("map_choices")),
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        CONDA_ENV
    shell:
        "cldf baselines --slices {input.slices:q} --maps {params.maps:q} --masks {params.masks:q}"
        " --settings {params.settings:q} --choices-out {output.choices:q} > {log:q} 2>&1"


rule fsl_masks:
    """Masks of the fully supervised UNet on the test slices (the upper bound of the table)."""
    input:
        slices=CAT.pattern("slices"),
        model=CAT.pattern("model", model="fsl_unet"),
    output:
        directory(CAT.pattern("baseline_masks", baseline="fsl_unet")),
    params:
        device=DEVICE,
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
    """CLDF masks of every test case (unlabelled protocol, gated) as NIfTI in the case's original geometry."""
    input:
        slices=CAT.pattern("slices"),
        masks=CAT.pattern("cldf_masks", protocol="unlabelled"),
        probs=PROBS,
        choices=SELECTION,
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
        "cldf nifti --slices {input.slices:q} --masks {input.masks:q} --array CLDF --probs {input.probs:q}"
        " --choices {input.choices:q} --out {output:q} > {log:q} 2>&1"
